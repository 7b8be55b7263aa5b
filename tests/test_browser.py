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


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run should have installed it")
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server)
        yield page
        browser.close()


def screenshot(page, name: str) -> None:
    shots = ROOT / "artifacts"
    shots.mkdir(exist_ok=True)
    page.screenshot(path=str(shots / name), full_page=True)


def test_model_page_renders_in_chromium(page):
    page.get_by_text("Baseline on the evaluation set").wait_for(timeout=180_000)
    page.get_by_text("Top next tokens").wait_for(timeout=120_000)
    page.wait_for_timeout(1500)
    screenshot(page, "model_page.png")
    assert page.locator('[data-testid="stException"]').count() == 0
    assert page.get_by_text("zoo:code-lm").count() > 0


def test_redundancy_page_draws_its_charts_and_fills_the_recipe(page):
    """Plotly must really draw in a browser (AppTest only sees the figure specs)."""
    page.get_by_role("link", name="Redundancy").click()
    page.get_by_text("measured Δ bits per byte").wait_for(timeout=300_000)
    charts = page.locator(".js-plotly-plot")
    charts.nth(5).wait_for(timeout=60_000)
    assert charts.count() == 6
    assert page.locator(".js-plotly-plot .heatmaplayer, .js-plotly-plot .hm").count() >= 2  # the heat maps drew
    page.get_by_role("button", name="Add this drop to the compression recipe").click()
    page.get_by_text("the recipe now has 1 edit(s)").wait_for(timeout=60_000)
    sidebar = page.locator('[data-testid="stSidebar"]')
    sidebar.get_by_text("Recipe: 1 edit(s)").wait_for(timeout=10_000)  # the sidebar shows it at once
    screenshot(page, "redundancy_page.png")
    assert page.locator('[data-testid="stException"]').count() == 0
