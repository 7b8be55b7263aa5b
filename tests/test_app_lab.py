"""AppTest runs of the Compression lab page: building a recipe and watching the metrics,
editing the recipe, history, uploads (good and bad), the Redundancy page's drops, the
digits CNN, and two sessions that never see each other's edits."""

import json

import pytest

from apptest_helpers import load, new_app, run

PAGE = "views/lab.py"


def lab_page(spec, typed=True):
    at = load(run(new_app()), spec, typed=typed)
    return run(at, PAGE)


def errors(at):
    return [e.value for e in at.error]


def metrics(at):
    return {m.label: (m.value, m.delta) for m in at.metric}


def recipe_lines(at):
    """The recipe list as the browser shows it: "1. magnitude 50% ..."."""
    return [m.value.replace("**", "") for m in at.markdown if m.value.startswith("**") and ".** " in m.value[:7]]


def session_recipe(at):
    return at.session_state["load_request"], next(lab.recipe for lab in at.session_state["labs"].values()
                                                   if lab.recipe.model == at.session_state["load_request"].spec)


def click(at, key):
    at.button(key=key).click()
    return run(at)


def choose_method(at, name):
    at.selectbox(key="lab_method").set_value(name)
    return run(at)


def upload(at, content, name="recipe.json"):
    at.file_uploader[0].set_value((name, content.encode() if isinstance(content, str) else content,
                                   "application/json"))
    return run(at)


def test_recipe_built_edited_and_walked_back(tiny_folder):
    at = lab_page(tiny_folder)
    assert at.title[0].value == f"Compression lab · {tiny_folder}"
    base = metrics(at)
    assert base["bits per byte"][1] in (None, "") and {"KL to base", "top-1 agreement", "parameters kept", "size",
                                                        "latency"} <= set(base)
    assert recipe_lines(at) == []
    click(at, "lab_add")  # magnitude 50%, all blocks
    first = metrics(at)
    assert recipe_lines(at) == ["1. magnitude 50% (all, per layer)"]
    assert first["bits per byte"][0] != base["bits per byte"][0] and first["bits per byte"][1]
    choose_method(at, "Drop a block, attention or MLP")
    at.radio(key="lab_drop_kind").set_value("mlp")
    at.selectbox(key="lab_drop_layer").set_value(1)
    click(at, "lab_add")
    assert recipe_lines(at) == ["1. magnitude 50% (all, per layer)", "2. drop mlp 1"]
    assert metrics(at)["parameters kept"] != first["parameters kept"]
    assert "Recipe: 2 edit(s)" in " ".join(c.value for c in at.sidebar.caption)
    click(at, "lab_up_1")
    assert recipe_lines(at) == ["1. drop mlp 1", "2. magnitude 50% (all, per layer)"]
    click(at, "lab_remove_0")
    assert recipe_lines(at) == ["1. magnitude 50% (all, per layer)"]
    click(at, "lab_undo")
    assert recipe_lines(at) == ["1. drop mlp 1", "2. magnitude 50% (all, per layer)"]
    click(at, "lab_redo")
    click(at, "lab_reset")
    assert recipe_lines(at) == [] and metrics(at)["bits per byte"] == base["bits per byte"]
    history = next(s for s in at.selectbox if s.label == "Restore a recipe from the history")
    assert len(history.options) == 4  # base, magnitude, + drop, drop first; going back added no rows
    history.set_value(2)
    run(at)
    click(at, "lab_restore")
    assert recipe_lines(at) == ["1. magnitude 50% (all, per layer)", "2. drop mlp 1"]
    assert len(session_recipe(at)[1].edits) == 2  # the session's recipe is the lab's
    assert not errors(at) and not at.exception


def test_replace_the_last_edit_reuses_the_ones_before(tiny_folder):
    at = lab_page(tiny_folder)
    choose_method(at, "Wanda pruning")
    click(at, "lab_add")
    at.slider(key="lab_wanda_sparsity").set_value(30)
    run(at)
    click(at, "lab_replace")
    assert recipe_lines(at) == ["1. Wanda 30% (all)"]
    lab = next(iter(at.session_state["labs"].values()))
    assert [p.label for p in lab.history] == ["base (no edits)", "Wanda 50% (all)", "Wanda 30% (all)"]


def test_heads_and_layer_skipping_controls(tiny_folder):
    at = lab_page(tiny_folder)
    choose_method(at, "Remove attention heads")
    at.selectbox(key="lab_heads_layer").set_value(2)
    run(at)
    at.multiselect(key="lab_heads_2").set_value([0, 3])
    run(at)
    click(at, "lab_add")
    assert recipe_lines(at) == ["1. remove heads 0, 3 of layer 2"]
    run(at)
    assert at.multiselect(key="lab_heads_2").options == ["1", "2"]  # only the heads still there
    choose_method(at, "Skip layers for a speed-up")
    assert "Keeps blocks 0, 2 of 0..2: K = round(3 / 1.5) = 2 blocks, a real speed-up of L / K = 1.50x over the " \
        "blocks." in [c.value for c in at.caption]
    assert at.slider(key="lab_skip_speedup").min == 1.3  # 1.1 and 1.2 would keep all three blocks
    click(at, "lab_add")
    assert recipe_lines(at)[1] == "2. skip layers for 1.5x speed-up" and not errors(at)


def test_uploaded_recipe_applies_with_the_same_metrics(tiny_folder):
    first = lab_page(tiny_folder)
    click(first, "lab_add")
    lab = next(iter(first.session_state["labs"].values()))
    second = lab_page(tiny_folder)
    upload(second, lab.recipe.to_json())
    assert recipe_lines(second) == ["1. magnitude 50% (all, per layer)"]
    assert metrics(second)["bits per byte"] == metrics(first)["bits per byte"]
    assert not errors(second)


@pytest.mark.parametrize("edits, message", [
    ([{"type": "magnitude", "sparsity": 1.0}], r"fraction in [0, 1)"),
    ([{"type": "magnitude", "sparsity": -0.1}], r"fraction in [0, 1)"),
    ([{"type": "remove_heads", "layer": 0, "heads": [7]}], "Layer 0 has no head(s) [7]"),
    ([{"type": "magnitude", "sparsity": 0.5, "strength": 2}], "no field(s) strength"),
    ([{"type": "drop", "kind": "mlp", "layer": "one"}], "needs a layer index"),
    ("another model", "made for another model"),
    ("not json", "not valid JSON"),
])
def test_bad_recipe_uploads_say_why_and_leave_the_recipe(tiny_folder, edits, message):
    at = lab_page(tiny_folder)
    click(at, "lab_add")
    before = recipe_lines(at)
    _, shared = session_recipe(at)
    if edits == "another model":
        text = json.dumps({"fingerprint": "0" * 16, "model": "gpt2", "edits": []})
    elif edits == "not json":
        text = "{edits: ["
    else:
        text = json.dumps({"fingerprint": shared.fingerprint, "edits": edits})
    upload(at, text)
    assert any(message in e for e in errors(at)), errors(at)
    assert recipe_lines(at) == before and len(session_recipe(at)[1].edits) == 1
    assert not at.exception
    good = json.dumps({"fingerprint": shared.fingerprint, "edits": [{"type": "magnitude", "sparsity": 0.3}]})
    upload(at, good, "good.json")  # the next file, in the same box, is applied (it was ignored once)
    assert not errors(at) and len(recipe_lines(at)) == 1 and "30%" in recipe_lines(at)[0]
    run(at)  # and only once
    assert not errors(at) and len(session_recipe(at)[1].edits) == 1


def test_drops_from_the_redundancy_page_appear_in_the_lab(tiny_folder):
    at = run(load(run(new_app()), tiny_folder, typed=True), "views/redundancy.py")
    next(b for b in at.button if b.label.startswith("Add this drop")).click()
    run(at)
    run(at, PAGE)
    lines = recipe_lines(at)
    assert len(lines) == 1 and lines[0].startswith("1. drop ")
    assert metrics(at)["KL to base"][0] != "0 nats" and not errors(at)


def test_two_sessions_keep_their_own_recipes(tiny_folder):
    from ui.session import load_base

    first, second = lab_page(tiny_folder), lab_page(tiny_folder)
    click(first, "lab_add")
    choose_method(second, "Drop a block, attention or MLP")
    click(second, "lab_add")
    run(first)
    assert recipe_lines(first) == ["1. magnitude 50% (all, per layer)"]
    assert recipe_lines(second) == ["1. drop block 0"]
    base = load_base(first.session_state["load_request"])
    assert base.current_fingerprint() == base.fingerprint  # neither touched the shared base model


def test_lab_on_the_digits_cnn():
    at = lab_page("zoo:digits-cnn", typed=False)
    offered = at.selectbox(key="lab_method").options  # other issues' methods may join these
    assert {"Magnitude pruning", "Wanda pruning", "Bypass a stage"} <= set(offered)
    assert not {"Remove attention heads", "Drop a block, attention or MLP", "Skip layers for a speed-up"} & set(offered)
    assert at.radio(key="lab_magnitude_scope").options == ["all layers", "chosen stages"]
    before = metrics(at)["accuracy"][0]
    choose_method(at, "Bypass a stage")
    assert at.selectbox(key="lab_drop_stage").options == ["conv2"]
    click(at, "lab_add")
    assert recipe_lines(at) == ["1. drop stage conv2"]
    assert metrics(at)["accuracy"][0] != before and metrics(at)["accuracy"][1].endswith("points")
    choose_method(at, "Bypass a stage")
    assert any("none can be bypassed" in i.value for i in at.info)
    choose_method(at, "Magnitude pruning")
    at.radio(key="lab_magnitude_scope").set_value("layers")
    run(at)
    assert at.multiselect(key="lab_magnitude_stages").options == ["conv1", "conv3", "fc1", "head"]
    assert at.button(key="lab_add").disabled  # nothing chosen yet
    assert not errors(at) and not at.exception


def test_lab_on_the_digits_denoiser():
    at = lab_page("zoo:digits-denoiser", typed=False)
    before = metrics(at)["PSNR (dB)"][0]  # images out: PSNR, no KL or agreement
    click(at, "lab_add")  # magnitude pruning at its default 50%
    assert recipe_lines(at)[0].startswith("1. magnitude")
    assert metrics(at)["PSNR (dB)"][0] != before
    assert not errors(at) and not at.exception


def test_an_unmeasurable_latency_can_be_timed_again(tiny_folder, monkeypatch):
    import itertools

    from analysis.compress import lab as lab_module
    from lib import latency

    def steady(base, model, repeats=latency.LATENCY_REPEATS, rows=1, predicted=None, clock=None, **kwargs):
        ticks = itertools.count(step=0.01)  # a fake clock: every forward takes 10 ms, base and model alike
        return latency.compare_latency(base, model, repeats, rows, predicted, lambda: next(ticks), **kwargs)

    monkeypatch.setattr(lab_module, "compare_latency", steady)  # no real timing in a test: never measurable
    at = lab_page(tiny_folder)
    click(at, "lab_add")  # magnitude pruning
    assert any("time it again when the machine is quieter" in c.value for c in at.caption)
    lab = next(iter(at.session_state["labs"].values()))
    first = lab.current.latency
    click(at, "lab_time_again")
    assert lab.current.latency is not first and len(lab.history) == 2 and not errors(at)


def test_grouped_query_heads_are_offered_by_group(tmp_path):
    """A Llama-shaped folder (4 heads sharing 2 key/value heads): the lab offers head
    groups, removes a whole group, and then offers the group that is left."""
    from tools.families import save_tiny

    at = lab_page(str(save_tiny("llama", tmp_path / "llama")))
    choose_method(at, "Remove attention heads")
    at.selectbox(key="lab_heads_layer").set_value(1)
    run(at)
    heads = at.multiselect(key="lab_heads_1")
    assert heads.options == ["heads 0, 1", "heads 2, 3"]
    heads.set_value([1])
    run(at)
    click(at, "lab_add")
    assert recipe_lines(at) == ["1. remove heads 2, 3 of layer 1"] and not errors(at)
    run(at)
    assert at.multiselect(key="lab_heads_1").options == ["heads 0, 1"]


def test_the_method_and_the_prompts_come_back_after_another_page():
    """Streamlit forgets a widget's value once a page without it has run: the lab's method,
    the Model page's and the Interpreter's prompts are given theirs back."""
    at = run(new_app(), "views/lab.py")
    at.selectbox(key="lab_method").set_value("Drop a block, attention or MLP")
    at = run(at)
    at = run(at, "views/redundancy.py")
    at = run(at, "views/lab.py")
    assert at.selectbox(key="lab_method").value == "Drop a block, attention or MLP"
    for page in ("views/model.py", "views/interpreter.py"):
        at = run(at, page)
        at.text_area[0].input("def f(x):\n    return")
        at = run(at)
        at = run(at, "views/channels.py")
        at = run(at, page)
        assert at.text_area[0].value == "def f(x):\n    return" and not at.warning, page
