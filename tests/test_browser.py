"""Real browser: `streamlit run app.py` headless, opened in Chromium."""

import os
import shutil
from pathlib import Path

import pytest

from tools.serve import CHROMIUM_ARGS, ROOT, app_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server():
    with app_server() as url:
        yield url


def test_model_page_renders_in_chromium(server):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run should have installed it")
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    shots = ROOT / "artifacts"
    shots.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server)
        page.get_by_text("Baseline on the evaluation set").wait_for(timeout=180_000)
        page.get_by_text("Top next tokens").wait_for(timeout=120_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(shots / "model_page.png"), full_page=True)
        assert page.locator('[data-testid="stException"]').count() == 0
        assert page.get_by_text("zoo:code-lm").count() > 0
        browser.close()
