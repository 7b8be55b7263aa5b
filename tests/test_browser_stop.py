"""Real browser: a Stop clicked right after Go on stops its step.

Streamlit keeps a focused button that the next run replaces (the Go on just clicked) at the
end of the page, shown until it loses focus. Pressing a Stop at the bottom of the page took
the focus, the kept button vanished, the page shifted under the pointer and the click was
lost: the step went on (found on the Redundancy page of a GPT-2-small-shaped model)."""

import pytest
from browser_helpers import chromium, idle

from tools.serve import app_server

STOPPED_WITHIN = 20_000  # ms: a click ends the step at its bar's next redraw, at most a second later


@pytest.fixture(scope="module")
def page():
    with chromium() as browser, app_server(script="tests/apps/two_steps.py") as url:
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(url)
        yield page
        page.close()


def test_a_stop_right_after_go_on_stops_its_step(page):
    stop = page.get_by_role("button", name="Stop", exact=True)
    stop.click(timeout=60_000)  # the first step's
    page.get_by_text("First step: stopped.").wait_for(timeout=STOPPED_WITHIN)
    idle(page)
    page.get_by_role("button", name="Go on").click()
    page.get_by_text("Second step:").wait_for(timeout=60_000)  # the first step finished, the second runs
    stop.click()
    page.get_by_text("Second step: stopped.").wait_for(timeout=STOPPED_WITHIN)
    assert page.get_by_text("Both steps finished.").count() == 0
