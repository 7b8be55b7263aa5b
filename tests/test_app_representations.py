"""The Representations page: AppTest runs on the default code model and an image model, and
a real Chromium session that opens it on both and sees their charts drawn."""


import pytest

from apptest_helpers import load, new_app, run

PAGE = "views/representations.py"


def captions(at):
    return " ".join(c.value for c in at.caption)


def test_code_model_shows_probes_and_weights_across_depth_with_their_numbers():
    at = run(run(new_app()), PAGE)
    assert not at.error and not at.info
    assert [s.value for s in at.subheader] == ["What each depth knows", "Weights across depth"]
    text = captions(at)
    for prop in ("Token kind", "Bracket depth", "Inside a string or comment", "Indentation level", "AST node type"):
        assert f"{prop}: best at depth " in text, prop
    assert "majority class" in text and "token alone" in text and "control task" in text
    assert "Selectivity (accuracy − control)" in text
    assert "θ_A + (l/L)·θ_B (L = 6)" in text and "Consecutive layers' weights have cosines" in text
    assert "With pure sharing" in text
    from ui.glossary import GLOSSARY

    helps = {h.value: h.proto.help for h in at.subheader}
    assert GLOSSARY["linear_probe"] in helps["What each depth knows"]
    assert GLOSSARY["depth_linearity"] in helps["Weights across depth"]
    at.select_slider(key="share_rank_zoo:code-lm").set_value(8)
    run(at)
    assert "With sharing with rank-8 deltas" in captions(at) and not at.error


def test_image_model_shows_stage_probes_and_says_why_there_are_no_weights_across_depth():
    at = load(run(new_app()), "zoo:digits-cnn")
    at = run(at, PAGE)
    assert not at.error
    assert [s.value for s in at.subheader] == ["What each depth knows", "Weights across depth"]
    text = captions(at)
    for prop in ("Class", "Ink mass", "Stroke thickness"):
        assert f"{prop}: best at " in text, prop
    assert "of test images (majority class" in text and "nearest prototype" in text and "control task" in text
    assert "Selectivity (accuracy − control)" in text
    assert len(at.info) == 1 and "stages differ in shape" in at.info[0].value
    assert not at.select_slider  # no sharing rank to choose for an image model
    assert "the nearest of 100 prototypes" in " ".join(m.value for m in at.markdown)


@pytest.fixture(scope="module")
def browser_page():
    from browser_helpers import chromium

    from tools.serve import app_server

    with app_server() as url, chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        yield page


def test_representations_page_draws_in_chromium(browser_page):
    from test_browser import screenshot, wait_model_page

    page = browser_page
    wait_model_page(page, "zoo:code-lm")
    page.get_by_role("link", name="Representations").click()
    page.get_by_text("With pure sharing").wait_for(timeout=300_000)  # the last caption: the page ran to its end
    charts = page.locator(".js-plotly-plot")
    charts.nth(3).wait_for(timeout=60_000)
    assert charts.count() == 4
    assert page.locator(".js-plotly-plot .scatterlayer .trace").count() >= 20  # 5 panels x 4 lines, then the rest
    page.wait_for_timeout(1000)
    screenshot(page, "representations_page.png")
    page.get_by_text("With pure sharing").scroll_into_view_if_needed()
    page.wait_for_timeout(1000)
    screenshot(page, "representations_page_weights.png")
    assert page.get_by_text("Token kind: best at depth").count() == 1
    assert page.locator('[data-testid="stException"]').count() == 0


def test_image_model_stage_probes_draw_in_chromium(browser_page):
    from test_browser import choose_bundled, screenshot

    page = browser_page  # on the Representations page of zoo:code-lm, where the test above left it
    choose_bundled(page, "zoo:digits-cnn")  # the page stays; it reruns on the new model
    page.get_by_text("stages differ in shape").wait_for(timeout=300_000)  # the page ran to its end
    charts = page.locator(".js-plotly-plot")
    charts.first.wait_for(timeout=60_000)
    assert charts.count() == 1
    assert page.locator(".js-plotly-plot .scatterlayer .trace").count() == 12  # 3 panels x 4 lines
    assert page.get_by_text("Class: best at stage").count() == 1
    assert page.locator('[data-testid="stException"]').count() == 0
    page.wait_for_timeout(1000)
    screenshot(page, "representations_page_cnn.png")
