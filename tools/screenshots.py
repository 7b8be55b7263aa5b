"""Screenshots of every page for a human look: python tools/screenshots.py [spec ...]

Starts `streamlit run app.py` headless on a free port, opens each page in Chromium
and saves artifacts/<page>-<model>.png (tall viewport: Streamlit scrolls inside).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main(specs: list[str]) -> None:
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                             "--server.port", str(port)], cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        out = ROOT / "artifacts"
        out.mkdir(exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 4200})
            page.goto(url)
            for spec in specs:
                page.get_by_text("Baseline on the evaluation set").wait_for(timeout=180_000)
                if spec != "zoo:code-lm":
                    page.get_by_label("…or a Hugging Face name / local folder").fill(spec)
                    page.get_by_role("button", name="Load").click()
                    page.get_by_text(f"Model · {spec}").wait_for(timeout=180_000)
                page.wait_for_timeout(2500)
                name = spec.replace("zoo:", "").replace("/", "_")
                page.screenshot(path=str(out / f"model-{name}.png"))
                page.get_by_role("link", name="Redundancy").click()
                page.get_by_text("Drop several modules").wait_for(timeout=300_000)
                page.get_by_text("measured Δ").wait_for(timeout=300_000)
                page.wait_for_timeout(3000)
                page.screenshot(path=str(out / f"redundancy-{name}.png"))
                page.get_by_role("link", name="Model").click()
            browser.close()
    finally:
        proc.terminate()


if __name__ == "__main__":
    main(sys.argv[1:] or ["zoo:code-lm"])
