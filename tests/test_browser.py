"""Real browser: `streamlit run app.py` headless, opened in Chromium.

Most tests share one server (module-scoped). The first-run tests each start their own:
the widget bugs they guard against (issue 9 item 2, issue 17 item 7) showed only on
the first script run of a freshly started server, never on a warm one.
"""

from pathlib import Path

import pytest
from browser_helpers import chromium

from tests.conftest import save_tiny_gpt2
from tools.serve import ROOT, app_server

TYPED_LABEL = "…or a Hugging Face name / local folder"
# Text drawn last on the Model page of each kind of model: once it is there, the page has run to its end.
PAGE_END = {"causal-lm": "probability of being the next token", "image-classifier": "with probability",
            "image-denoiser": "clean target"}
ZOO_KINDS = {"zoo:code-lm": "causal-lm", "zoo:induction-2l": "causal-lm", "zoo:digits-cnn": "image-classifier",
             "zoo:digits-denoiser": "image-denoiser"}


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def server():
    with app_server() as url:
        yield url


@pytest.fixture(scope="module")
def page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server)
    yield page
    page.close()


@pytest.fixture
def fresh_page(browser):
    """A page on a server started for this test alone."""
    with app_server() as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        yield page
        page.close()


def screenshot(page, name: str) -> None:
    shots = ROOT / "artifacts"
    shots.mkdir(exist_ok=True)
    page.screenshot(path=str(shots / name), full_page=True)


def wait_model_page(page, spec: str, kind: str = "causal-lm") -> None:
    """Wait until the Model page of `spec` has run to its end (its title is drawn, the script
    stopped, and the page's last element is there, not a stale one from the model before)."""
    page.get_by_role("heading", name=f"Model · {spec}").wait_for(timeout=180_000)
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for(timeout=180_000)
    page.get_by_text(PAGE_END[kind]).first.wait_for(timeout=60_000)  # plotly draws after the run ends


def choose_bundled(page, spec: str) -> None:
    """Pick `spec` in the sidebar's "Bundled model" list."""
    page.locator('[data-testid="stSidebar"]').get_by_role("combobox", name="Bundled model").click()
    page.get_by_role("option", name=spec).click()


def check_typed_folder_loads_first_time(page, folder: Path) -> None:
    """Fresh server: once the first page is drawn, a folder typed into the name/folder box
    stays there after Enter and loads (the old pages/ layout emptied the box)."""
    from playwright.sync_api import expect

    wait_model_page(page, "zoo:code-lm")
    sidebar = page.locator('[data-testid="stSidebar"]')
    box = sidebar.get_by_role("textbox", name=TYPED_LABEL)
    box.fill(str(folder))
    box.press("Enter")
    page.wait_for_timeout(2000)
    expect(box).to_have_count(1, timeout=1)  # the old layout drew a second, empty box beside a stale one
    expect(box).to_have_value(str(folder), timeout=1)
    wait_model_page(page, str(folder))
    expect(sidebar.get_by_text(f"Loaded: {folder}")).to_be_visible(timeout=1)
    expect(box).to_have_value(str(folder), timeout=1)
    assert page.locator('[data-testid="stException"]').count() == 0


def check_first_choice_sticks(page) -> None:
    """Fresh server: the first model chosen in the list is still chosen 2 s later and loads
    (the old pages/ layout snapped the list back to zoo:code-lm)."""
    from playwright.sync_api import expect

    wait_model_page(page, "zoo:code-lm")
    choose_bundled(page, "zoo:digits-cnn")
    page.wait_for_timeout(2000)
    combo = page.locator('[data-testid="stSidebar"]').get_by_role("combobox", name="Bundled model")
    expect(combo).to_have_value("zoo:digits-cnn", timeout=1)
    wait_model_page(page, "zoo:digits-cnn", "image-classifier")
    expect(combo).to_have_value("zoo:digits-cnn", timeout=1)
    assert page.locator('[data-testid="stException"]').count() == 0


def test_typed_folder_loads_on_the_first_try_on_a_fresh_server(fresh_page, tmp_path):
    save_tiny_gpt2(tmp_path)
    check_typed_folder_loads_first_time(fresh_page, tmp_path)


def test_first_choice_in_the_list_sticks_on_a_fresh_server(fresh_page):
    check_first_choice_sticks(fresh_page)


def test_model_page_renders_in_chromium(page):
    wait_model_page(page, "zoo:code-lm")
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


def test_every_bundled_model_page_draws_without_a_traceback(page):
    """The Model page of each bundled model, chosen from the list one after another (runs last:
    it leaves the shared page on another model)."""
    page.get_by_role("link", name="Model").click()
    for spec, kind in ZOO_KINDS.items():
        if spec != "zoo:code-lm":
            choose_bundled(page, spec)
        wait_model_page(page, spec, kind)
        assert page.locator('[data-testid="stException"]').count() == 0, spec
        assert page.locator(".js-plotly-plot").count() >= 1, spec
