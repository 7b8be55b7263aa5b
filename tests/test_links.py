"""Links and the visitor's history across sessions (`ui.links`, `ui.experiments`): the recipe's
encoding in an address, an AppTest session opened from query parameters restoring the model
and the recipe with the same metrics, hostile parameters refused in words, a refresh keeping
the history, two visitors kept apart, and a real browser opening a shared link in a fresh
context."""

import base64
import os
import zlib
from pathlib import Path

import pytest
from browser_helpers import SLOW, chromium, idle, metric, require_chromium

from analysis.compress.journal import VISITOR, Journal
from analysis.compress.prune.pruning import Drop, Magnitude
from analysis.compress.recipe import MAX_RECIPE_BYTES, Recipe
from lib.errors import RecipeError
from ui import links

from apptest_helpers import new_app, run

PAGE = "views/lab.py"


def opened(params: dict[str, str], page: str = PAGE):
    """A new browser session opening the app's address with these query parameters."""
    at = new_app()
    at.query_params.update(params)
    return run(at, page)


def metrics(at):
    return {m.label: m.value for m in at.metric}


def recipe_lines(at):
    return [m.value.replace("**", "") for m in at.markdown if m.value.startswith("**") and ".** " in m.value[:7]]


def history_options(at):
    box = next(s for s in at.selectbox if s.label == "Restore a recipe from the history")
    return list(box.options)  # as shown: "1: magnitude ..."


def the_lab(at):
    return next(iter(at.session_state["labs"].values()))


# ---------------------------------------------------------------------- the encoding


def test_a_recipe_round_trips_through_its_url_form():
    recipe = Recipe("f" * 16, [Magnitude(0.5, scope="mlp"), Drop("block", 2)], model="zoo:code-lm")
    value = links.encode_recipe(recipe)
    assert value.startswith("z") and set(value[1:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                                           "0123456789-_")
    again = Recipe.from_json(links.decode_recipe(value))
    assert again == recipe and again.digest == recipe.digest


def _packed(data: bytes) -> str:
    return "z" + base64.urlsafe_b64encode(zlib.compress(data)).rstrip(b"=").decode()


@pytest.mark.parametrize("value, message", [
    ("plain", "not one LayerScope writes"),
    ("z<script>", "not one LayerScope writes"),
    ("z" + "A" * 9000, "not one LayerScope writes"),
    ("zAAAA", "cannot be unpacked"),
    (_packed(b'{"edits": []}')[:-6], "cut off"),
    (_packed(b" " * (MAX_RECIPE_BYTES + 10)), "unpacks to more than"),  # a zip bomb stops at the limit
    (_packed(b"\xff\xfe"), "not text"),
])
def test_a_bad_url_recipe_is_refused_in_words(value, message):
    with pytest.raises(RecipeError, match=message):
        links.decode_recipe(value)


# ---------------------------------------------------------------------- sessions opened from an address


def test_a_link_restores_model_and_recipe_with_the_same_metrics(tiny_folder):
    first = opened({"m": tiny_folder})
    assert first.session_state["load_request"].spec == tiny_folder
    first.button(key="lab_add").click()  # magnitude 50%, all blocks
    run(first)
    written = dict(first.query_params)
    assert written["m"] == tiny_folder and VISITOR.fullmatch(written["v"])
    assert Recipe.from_json(links.decode_recipe(written["r"])) == the_lab(first).recipe

    shared = {k: v for k, v in written.items() if k != "v"}  # the link offered for sharing
    second = opened(shared)
    assert recipe_lines(second) == ["1. magnitude 50% (all, per layer)"]
    for label in ("bits per byte", "KL to base", "top-1 agreement", "size"):
        assert metrics(second)[label] == metrics(first)[label], label
    assert second.session_state["visitor"] != first.session_state["visitor"]
    assert len(history_options(second)) == 2  # base and the shared recipe: not the first visitor's history
    assert not second.error and not second.exception


def test_a_refresh_keeps_the_visitors_history_and_another_visitor_does_not_see_it(tiny_folder):
    first = opened({"m": tiny_folder})
    first.button(key="lab_add").click()
    run(first)
    first.selectbox(key="lab_method").set_value("Drop a block, attention or MLP")
    run(first)
    first.button(key="lab_add").click()
    run(first)
    address = dict(first.query_params)

    refreshed = opened(address)  # the same address, a new session: the same visitor
    assert refreshed.session_state["visitor"] == address["v"]
    assert recipe_lines(refreshed) == ["1. magnitude 50% (all, per layer)", "2. drop block 0"]
    options = history_options(refreshed)
    assert len(options) == 3 and "magnitude 50% (all, per layer) (earlier session)" in options[1]
    assert "Your experiments on this model (3 kept)" in [e.label for e in refreshed.expander]

    stranger = opened({"m": tiny_folder})  # another browser, no link
    assert stranger.session_state["visitor"] != address["v"] and len(history_options(stranger)) == 1


def test_a_long_recipe_goes_by_its_stored_row(tiny_folder, monkeypatch):
    monkeypatch.setattr(links, "MAX_INLINE", 10)
    first = opened({"m": tiny_folder})
    first.button(key="lab_add").click()
    run(first)
    value = first.query_params["r"]
    assert links.ROW_REFERENCE.fullmatch(value) and value.endswith(the_lab(first).current.digest)
    second = opened({"m": tiny_folder, "r": value})
    assert recipe_lines(second) == ["1. magnitude 50% (all, per layer)"]
    row = value.split(".")[0]
    wrong = opened({"m": tiny_folder, "r": f"{row}.{'0' * 16}"})  # a guessed digest opens nothing
    assert recipe_lines(wrong) == [] and any("not in this server's experiments database" in w.value
                                             for w in wrong.warning)


def test_hostile_parameters_are_refused_in_words_and_the_app_opens(tmp_path):
    at = opened({"m": "x" * 1001, "p": "float8", "v": "../../etc", "r": "z%%%"})
    warnings = " ".join(w.value for w in at.warning)
    assert "model name is empty or longer" in warnings and "precision is not one of" in warnings
    assert "visitor id in this address" in warnings and "not one LayerScope writes" in warnings
    assert at.session_state["load_request"].spec == "zoo:code-lm" and recipe_lines(at) == []
    assert VISITOR.fullmatch(at.query_params["v"]) and not at.exception


def test_a_link_cannot_load_what_typing_would_not(tmp_path):
    from conftest import save_tiny_gpt2

    save_tiny_gpt2(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")  # only "pickled" weights
    os.environ.pop("LAYERSCOPE_ALLOW_PICKLE", None)
    at = opened({"m": str(tmp_path), "allow_pickle": "1"}, page="views/model.py")
    assert any("pickled" in e.value.lower() for e in at.sidebar.error)
    assert at.session_state["load_request"].spec == "zoo:code-lm"


def test_a_recipe_for_another_model_is_refused_and_the_lab_stays(tiny_folder):
    other = Recipe("0" * 16, [Magnitude(0.5)], model="another")
    at = opened({"m": tiny_folder, "r": links.encode_recipe(other)})
    assert any("made for another model" in e.value for e in at.error)
    assert recipe_lines(at) == [] and "r" not in at.query_params and not at.exception


# ---------------------------------------------------------------------- a real browser


def _fingerprint() -> str:
    from lib.models import load_model

    return load_model("zoo:code-lm").fingerprint


def test_a_shared_link_opens_the_same_lab_in_a_fresh_browser(tmp_path):
    from playwright.sync_api import expect

    from tools.serve import app_server

    require_chromium()
    shots = Path(__file__).resolve().parents[1] / "artifacts" / "links"
    shots.mkdir(parents=True, exist_ok=True)
    with app_server() as url, chromium() as browser:
        mine = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = mine.new_page()
        page.goto(url + "/lab")
        page.get_by_role("heading", name="Compression lab · zoo:code-lm").wait_for(timeout=SLOW)
        page.get_by_text("top-1 agreement").first.wait_for(timeout=SLOW)
        idle(page)
        page.get_by_role("button", name="Add to recipe").click()  # magnitude 50%, all blocks
        page.get_by_text("1. magnitude 50% (all, per layer)").wait_for(timeout=SLOW)
        idle(page)
        page.wait_for_function("() => location.search.includes('r=z')", timeout=SLOW)
        pruned = metric(page, "bits per byte")

        page.reload()  # a refresh: the same recipe, and the history kept
        page.get_by_text("1. magnitude 50% (all, per layer)").wait_for(timeout=SLOW)
        idle(page)
        expect(page.get_by_text("Your experiments on this model (2 kept)")).to_be_visible()
        page.screenshot(path=str(shots / "after-refresh.png"), full_page=True)
        with page.expect_download(timeout=SLOW) as download:
            page.get_by_role("button", name="Report (HTML)").click()
        report = download.value.suggested_filename
        visitor = page.url.split("v=")[1].split("&")[0]
        noted = [r.exported for r in Journal().experiments(visitor, _fingerprint()) if r.digest]
        assert noted == [(report,)] and report.endswith("-report.html")  # the database notes the export
        page.get_by_text("Link to this view").click()
        link = page.locator('[data-testid="stSidebar"] [data-testid="stCode"]').inner_text().strip()
        assert link.startswith(url + "/lab?") and "v=" not in link and "r=z" in link

        fresh = browser.new_context(viewport={"width": 1400, "height": 1000})  # no cookies, no storage
        other = fresh.new_page()
        other.goto(link)
        other.get_by_text("1. magnitude 50% (all, per layer)").wait_for(timeout=SLOW)
        idle(other)
        assert metric(other, "bits per byte") == pruned
        expect(other.get_by_text("Your experiments on this model (2 kept)")).to_be_visible()  # base + this one
        assert "v=" in other.url and other.url.split("v=")[1][:16] != page.url.split("v=")[1][:16]
        other.screenshot(path=str(shots / "fresh-context.png"), full_page=True)
        assert page.locator('[data-testid="stException"]').count() == 0
        assert other.locator('[data-testid="stException"]').count() == 0
        address = page.url.split("?", 1)[1]  # mine, with my visitor id
        stranger = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()  # no link given
        stranger.goto(url + "/lab")
        stranger.get_by_role("heading", name="Compression lab · zoo:code-lm").wait_for(timeout=SLOW)
        idle(stranger)
        expect(stranger.get_by_text("Your experiments on this model (1 kept)")).to_be_visible()  # the base only
        assert stranger.get_by_text("magnitude 50%").count() == 0  # nothing of the other two visitors'
    with app_server() as url, chromium() as browser:  # the server restarted: my history is still there
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        page.goto(f"{url}/lab?{address}")
        page.get_by_text("1. magnitude 50% (all, per layer)").wait_for(timeout=SLOW)
        idle(page)
        expect(page.get_by_text("Your experiments on this model (2 kept)")).to_be_visible()
        assert metric(page, "bits per byte") == pruned


def test_an_unusable_data_folder_leaves_the_lab_working(tiny_folder, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LAYERSCOPE_DATA", str(tmp_path / "a-file" / "data"))  # cannot be a folder
    at = opened({"m": tiny_folder})
    at.button(key="lab_add").click()
    run(at)
    assert recipe_lines(at) == ["1. magnitude 50% (all, per layer)"] and not at.exception
    assert any("This history is not being saved" in c.value for c in at.caption)
    assert len(history_options(at)) == 2  # this session's points, drawn without the database
    assert at.query_params["r"].startswith("z")  # an inline link needs no database
