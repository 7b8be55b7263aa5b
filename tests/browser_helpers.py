"""What every Chromium test shares: Debian's Chromium (a skip where it is missing, a
failure in CI, where `.ci/run` installs it), a headless browser on it, waiting until the
script run an action started has finished, and a metric's value as drawn."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tools.serve import CHROMIUM_ARGS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SLOW = 300_000  # ms: a first visit and each lab change run full forwards on a shared CPU


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run should have installed it")
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium (playwright's Browser), closed afterwards."""
    from playwright.sync_api import sync_playwright

    require_chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def idle(page) -> None:
    """Wait until the script run the last action started has finished."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for(timeout=SLOW)


def metric(page, label: str) -> str:
    box = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    return box.locator('[data-testid="stMetricValue"]').inner_text()
