"""Real browser: every guided scenario end to end at a projector's 1280x720, each started
from its link; every step's computed check passes (a green "What you should see"), and
each step is saved as a screenshot (artifacts/scenarios/)."""

import pytest
from browser_helpers import SLOW, chromium, idle

from tools.serve import ROOT, app_server
from ui.scenarios import SCENARIOS


@pytest.fixture(scope="module")
def browser_and_server():
    with app_server() as url, chromium() as browser:
        yield browser, url


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
