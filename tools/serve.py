"""Run `streamlit run app.py` headless on a free localhost port, and a headless Chromium to
drive it, for browser checks (tests, bench, screenshots)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's; playwright cannot download its own here
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium on CHROMIUM (playwright's Browser), closed afterwards. Callers
    check that CHROMIUM exists first and say what to do where it does not."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def app_server(timeout_s: float = 60, root: Path = ROOT, script: str = "app.py") -> Iterator[str]:
    """Yield the URL of `streamlit run <script>` (the app unless told) started in `root` (this
    checkout unless told, e.g. an older tree unpacked with `git archive`); the server is
    stopped on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The log goes to a file, not a pipe: nobody reads a pipe while the app runs, and a full
    # one (64 KiB of tracebacks) would block the server mid-test.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", script, "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
            cwd=root, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, log, timeout_s)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(url: str, proc: subprocess.Popen, log, timeout_s: float) -> None:
    """Poll the health endpoint until it answers; raise with the log's tail if the server died or never came up."""
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                log.seek(0)
                raise RuntimeError("streamlit did not start: " + log.read().decode(errors="replace")[-2000:]) from None
            time.sleep(0.05)  # a coarse poll would add its interval to the cold-start rows
