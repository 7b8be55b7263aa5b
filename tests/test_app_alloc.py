"""AppTest runs of the Compression lab's allocating edits (issue 15): low-rank
factorisation and block sharing on a tiny GPT-2, rate-distortion allocation on the
digits CNN; each shows its figure and lands in the recipe with the metrics moving."""

import pytest

from apptest_helpers import load, new_app, run

PAGE = "views/lab.py"


def lab(spec, typed):
    return run(load(run(new_app()), spec, typed=typed), PAGE)


def add(at):
    at.button(key="lab_add").click()
    return run(at)


def recipe_of(at):
    return next(lab.recipe for lab in at.session_state["labs"].values()
                if lab.recipe.model == at.session_state["load_request"].spec)


def test_sharing_then_low_rank_in_the_lab(tiny_folder):
    at = lab(tiny_folder, typed=True)
    at.selectbox(key="lab_method").set_value("Share a block's weights")
    run(at)
    add(at)
    assert not at.exception and [e.type for e in recipe_of(at).edits] == ["share_layers"]
    at.selectbox(key="lab_method").set_value("Low-rank factorisation")
    run(at)
    at.slider(key="lab_lowrank_rank").set_value(4)
    run(at)
    assert len(at.get("plotly_chart")) >= 1  # the spectrum with the cut
    add(at)
    assert not at.exception and [e.type for e in recipe_of(at).edits] == ["share_layers", "low_rank"]
    assert not at.error, [e.value for e in at.error]


def test_rate_distortion_allocation_on_the_digits_cnn():
    at = lab("zoo:digits-cnn", typed=False)
    at.selectbox(key="lab_method").set_value("Allocate sparsity by rate-distortion")
    run(at)
    at.toggle(key="lab_rd_go").set_value(True)
    run(at)
    table = at.dataframe[0].value
    assert list(table["allocation"]) == ["rate-distortion (chosen)", "uniform"]
    predicted = [float(v) for v in table["predicted distortion (sum of the curves)"]]
    measured = [float(v) for v in table["measured distortion (all layers pruned at once)"]]
    assert all(m > 0 for m in measured) and measured != predicted  # measured on the model, not copied
    assert any("Both plans prune 50.00% of the weights" in c.value for c in at.caption)  # the slider's 50 %, exactly
    add(at)
    assert not at.exception and [e.type for e in recipe_of(at).edits] == ["layer_sparsity"]


def test_evolutionary_search_runs_and_a_stopped_one_keeps_its_best(monkeypatch):
    from analysis.compress.prune import allocation as alloc
    from lib import data
    from lib.models import load_model
    from ui.store import STORE

    at = lab("zoo:digits-cnn", typed=False)
    at.selectbox(key="lab_method").set_value("Search per-layer sparsity (evolutionary)")
    run(at)
    at.slider(key="lab_evo_generations").set_value(2)
    at.toggle(key="lab_evo_go").set_value(True)
    run(at)
    assert at.button(key="lab_evo_stop")  # offered while the search runs
    add(at)
    [edit] = recipe_of(at).edits
    assert edit.type == "layer_sparsity" and edit.method == "evolutionary"

    # A stop click reruns the page at once; the rerun shows the best plan of the generations done.
    handle = load_model("zoo:digits-cnn")
    model = (handle.fingerprint, data.default_batch(handle).digest)  # results are kept per model and batch
    key = ("evolution", *model, 0.5, 3)
    so_far = STORE.get(("evolution", *model, 0.5, 2))
    STORE.put(key + ("so far",), alloc.Search(so_far.layers, so_far.levels, so_far.best_kl, so_far.curve[:2]))
    monkeypatch.setattr(alloc, "evolve", lambda *a, **k: pytest.fail("a stopped search must not run again"))
    at.session_state["lab_evo_stopped"] = key
    at.slider(key="lab_evo_generations").set_value(3)
    run(at)
    assert any("Stopped after 1 of 3 generations" in c.value for c in at.caption)
    assert not at.button(key="lab_add").disabled
