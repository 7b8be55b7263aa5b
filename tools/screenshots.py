"""Screenshots of every page for a human look: python -m tools.screenshots [spec ...]

Starts `streamlit run app.py` headless on a free port, opens each page in Chromium
and saves artifacts/<page>-<model>.png (tall viewport: Streamlit scrolls inside).
"""

from __future__ import annotations

import sys

from tools.serve import CHROMIUM_ARGS, ROOT, app_server


def main(specs: list[str]) -> None:
    from playwright.sync_api import sync_playwright

    out = ROOT / "artifacts"
    out.mkdir(exist_ok=True)
    with app_server() as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 4200})
        page.goto(url)
        for spec in specs:
            page.get_by_text("Baseline on the evaluation set").wait_for(timeout=180_000)
            if spec != "zoo:code-lm":
                page.get_by_label("…or a Hugging Face name / local folder").fill(spec)
                page.get_by_role("button", name="Load").click()
                page.get_by_text(f"Model · {spec}").wait_for(timeout=180_000)
            if "digits" not in spec:  # language models: wait for the next-token chart
                page.get_by_text("Top next tokens").wait_for(timeout=120_000)
            page.wait_for_timeout(2500)
            name = spec.replace("zoo:", "").replace("/", "_")
            page.screenshot(path=str(out / f"model-{name}.png"))
            page.get_by_role("link", name="Redundancy").click()
            page.get_by_text("measured Δ").wait_for(timeout=300_000)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(out / f"redundancy-{name}.png"))
            page.get_by_role("link", name="Model").click()
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1:] or ["zoo:code-lm"])
