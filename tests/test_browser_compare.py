"""Real browser on the lab's "What the recipe changed" section (zoo:code-lm, two blocks
dropped): the intervals table, the flipped answers in their text, the KL strip, the
internals side by side and the verified badge are drawn, with no traceback."""

from browser_helpers import SLOW, idle
from test_browser_lab import _shots, page  # noqa: F401 - the module's page fixture


def drop_block(page, layer: int) -> None:  # noqa: F811 - the fixture's page
    page.get_by_role("combobox", name="Method").click()
    page.get_by_role("option", name="Drop a block, attention or MLP").click()
    idle(page)
    page.get_by_role("combobox", name="Layer").click()
    page.get_by_role("option", name=str(layer), exact=True).click()
    idle(page)
    page.get_by_role("button", name="Add to recipe").click()
    idle(page)


def test_what_two_dropped_blocks_changed(page):  # noqa: F811
    page.get_by_role("heading", name="Model · zoo:code-lm").wait_for(timeout=SLOW)
    sidebar = page.locator('[data-testid="stSidebar"]')
    sidebar.get_by_text("verified: outputs match to").wait_for(timeout=SLOW)
    page.get_by_role("link", name="Compression lab").click()
    page.get_by_role("heading", name="Compression lab · zoo:code-lm").wait_for(timeout=SLOW)
    idle(page)
    drop_block(page, 2)
    page.get_by_text("1. drop block 2").wait_for(timeout=SLOW)
    drop_block(page, 3)
    page.get_by_text("2. drop block 3").wait_for(timeout=SLOW)
    page.get_by_text("Flipped answers").wait_for(timeout=SLOW)
    page.get_by_text("Head roles, base and edited").wait_for(timeout=SLOW)
    idle(page)
    assert page.locator("mark").count() >= 1  # each flipped answer's next token, marked in its text
    assert page.locator("span[title^='KL ']").count() > 100  # the strip: one shaded span per token
    assert page.get_by_text("percentile bootstrap over the 16 evaluation windows").count() >= 1
    assert page.get_by_text("Removed: block 2, block 3").count() >= 1
    section = page.get_by_role("heading", name="What the recipe changed")
    section.scroll_into_view_if_needed()
    charts = page.locator(".js-plotly-plot")
    assert charts.count() >= 2  # the internals side by side, and the history
    page.screenshot(path=str(_shots() / "lab-what-changed.png"), full_page=True)
    assert page.locator('[data-testid="stException"]').count() == 0
