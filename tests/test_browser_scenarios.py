"""Real browser: every guided scenario end to end at a projector's 1280x720, each started
from its link; every step's computed check passes (a green "What you should see"), and
each step is saved as a screenshot (artifacts/scenarios/)."""

import os
import shutil
from pathlib import Path

import pytest

from tools.serve import CHROMIUM_ARGS, ROOT, app_server
from ui.scenarios import SCENARIOS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SLOW = 300_000


@pytest.fixture(scope="module")
def browser_and_server():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run should have installed it")
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    with app_server() as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser, url
        browser.close()


def idle(page) -> None:
    page.wait_for_timeout(300)
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for(timeout=SLOW)


@pytest.mark.slow
@pytest.mark.parametrize("key", list(SCENARIOS))
def test_scenario_runs_end_to_end(browser_and_server, key):
    browser, url = browser_and_server
    scenario = SCENARIOS[key]
    shots = ROOT / "artifacts" / "scenarios"
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    try:
        page.goto(f"{url}/?tour={key}")
        for index in range(len(scenario.steps)):
            page.get_by_text(f"step {index + 1} of {len(scenario.steps)}").first.wait_for(timeout=SLOW)
            seen = page.locator('[data-testid="stAlertContentSuccess"]').filter(has_text="What you should see")
            seen.first.wait_for(timeout=SLOW)
            idle(page)
            assert page.locator('[data-testid="stException"]').count() == 0
            failed = page.locator('[data-testid="stAlertContentWarning"]').filter(has_text="What you should see")
            assert failed.count() == 0, failed.first.inner_text()  # a check that did not hold is yellow
            assert seen.count() == 1
            page.screenshot(path=str(shots / f"{key}-{index + 1}.png"))
            page.get_by_role("button", name="Finish" if index == len(scenario.steps) - 1 else "Next").click()
            idle(page)
        assert page.get_by_text(f"step 1 of {len(scenario.steps)}").count() == 0  # finished: the banner is gone
    finally:
        page.close()
