"""AppTest runs of the Compression lab's early-exit method (issue 14): criterion, threshold
and lens on zoo:code-lm and zoo:digits-cnn, the numbers and the trade-off curve following
the threshold from one recorded pass, the edit added and measured by the lab like any
other (stacked with pruning and quantization, through a recipe file), a tuned lens
trained once on request, and thresholds out of range refused in words."""

import json

import pytest

from apptest_helpers import load, new_app, run

PAGE = "views/lab.py"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from conftest import save_tiny_gpt2

    folder = tmp_path_factory.mktemp("lab-exit-gpt2")
    save_tiny_gpt2(folder, seed=14)  # weights of its own: no other test has trained a lens for them
    return str(folder)


def exit_page(spec, typed=False):
    at = run(load(run(new_app()), spec, typed=typed), PAGE)
    at.selectbox(key="lab_method").set_value("Early exit")
    return run(at)


def controls(at):
    """The exit method's numbers (drawn above the lab's metrics panel: first of a label)."""
    shown = {}
    for m in at.metric:
        shown.setdefault(m.label, m.value)
    return shown


def panel(at):
    """The lab's metrics panel (drawn after the controls: last of a label)."""
    return {m.label: m.value for m in at.metric}


def percent(text):
    return float(text.rstrip("%"))


def recipe_lines(at):
    return [m.value.replace("**", "") for m in at.markdown if m.value.startswith("**") and ".** " in m.value[:7]]


def lab_of(at):
    return next(iter(at.session_state["labs"].values()))


def chart(at, key):
    """The plotly figure of the chart with this key, as JSON."""
    found = [e for e in at.get("plotly_chart") if key in e.proto.id]
    assert len(found) == 1, [e.proto.id for e in at.get("plotly_chart")]
    return json.loads(found[0].proto.spec)


def click(at, key):
    at.button(key=key).click()
    return run(at)


def upload(at, text):
    at.file_uploader[0].set_value(("recipe.json", text.encode(), "application/json"))
    return run(at)


def test_code_lm_threshold_curve_prompt_and_the_edit_in_the_recipe(monkeypatch):
    from analysis.compress import exits

    at = exit_page("zoo:code-lm")
    passes = []  # recorded passes from here on: moving the threshold or the criterion must not add one
    record = exits.collect_exit_stats
    monkeypatch.setattr(exits, "collect_exit_stats", lambda *a, **k: passes.append(1) or record(*a, **k))
    assert at.radio(key="lab_exit_criterion").options == ["max probability ≥ t", "entropy ≤ t (nats)",
                                                          "argmax unchanged for t checks", "cos(h_l, h_l-1) ≥ t"]
    assert at.radio(key="lab_exit_lens").options == ["logit lens", "tuned lens"]
    strict = controls(at)
    assert "mean exit layer (of 6)" in strict and "saved (oracle)" in strict
    at.slider(key="lab_exit_threshold_max_prob").set_value(0.3)
    run(at)
    loose = controls(at)
    assert float(loose["mean exit layer (of 6)"]) < float(strict["mean exit layer (of 6)"])
    assert percent(loose["agreement"]) < percent(strict["agreement"])
    assert percent(loose["compute saved"]) > percent(strict["compute saved"])
    assert percent(loose["saved (oracle)"]) > percent(loose["compute saved"])  # keys and values charged
    figure = chart(at, "lab_exit_tradeoff")
    lines = [t for t in figure["data"] if t["name"] != "current threshold"]
    star = next(t for t in figure["data"] if t["name"] == "current threshold")
    assert len(lines) == 4 and star["x"][0] == pytest.approx(percent(loose["compute saved"]), abs=0.05)
    assert star["y"][0] == pytest.approx(percent(loose["agreement"]) / 100, abs=5e-4)
    at.toggle(key="lab_exit_oracle").set_value(True)
    at.radio(key="lab_exit_quality").set_value("perplexity")
    run(at)
    star = next(t for t in chart(at, "lab_exit_tradeoff")["data"] if t["name"] == "current threshold")
    assert star["x"][0] == pytest.approx(percent(loose["saved (oracle)"]), abs=0.05)
    assert star["y"][0] == pytest.approx(float(loose["perplexity"]), rel=5e-3)
    at.radio(key="lab_exit_criterion").set_value("saturation")
    run(at)
    assert controls(at)["mean exit layer (of 6)"] != loose["mean exit layer (of 6)"]
    at.radio(key="lab_exit_criterion").set_value("max_prob")
    run(at)
    assert controls(at) == loose and passes == [] and not at.warning  # its threshold kept, nothing recomputed

    at.text_input(key="lab_exit_prompt").input("x = 1").run()
    tokens = chart(at, "lab_exit_tokens")["data"][0]
    assert [c for c in tokens["text"][0] if c] == ["BOS", "x", tokens["text"][0][2], "=", tokens["text"][0][4], "1"]
    assert any("of 6 exit early" in c.value for c in at.caption)
    at.text_input(key="lab_exit_prompt").input("   ").run()
    assert any("prompt is empty" in w.value for w in at.warning)

    click(at, "lab_add")
    assert recipe_lines(at) == ["1. exit when max prob ≥ 0.3 (logit lens)"]
    measured = panel(at)  # the lab's forward with the exit rule, against the base model
    assert measured["top-1 agreement"] == loose["agreement"] != "100.0%"
    assert measured["compute saved"] == loose["compute saved"] and measured["KL to base"] != "0 nats"
    assert any("does not exit early" in c.value for c in at.caption)  # the zip download says what it leaves out
    assert any("This is the recipe's early exit" in i.value for i in at.info)
    at.slider(key="lab_exit_threshold_max_prob").set_value(0.5)
    click(at, "lab_add")  # a second exit is refused in words, the recipe kept
    assert any("already exits early" in e.value for e in at.error)
    assert recipe_lines(at) == ["1. exit when max prob ≥ 0.3 (logit lens)"]
    click(at, "lab_replace")
    assert recipe_lines(at) == ["1. exit when max prob ≥ 0.5 (logit lens)"]
    assert percent(panel(at)["compute saved"]) < percent(loose["compute saved"])
    click(at, "lab_undo")
    assert recipe_lines(at) == ["1. exit when max prob ≥ 0.3 (logit lens)"]

    at.selectbox(key="lab_method").set_value("Magnitude pruning")
    click(at, "lab_add")
    assert recipe_lines(at) == ["1. exit when max prob ≥ 0.3 (logit lens)", "2. magnitude 50% (all, per layer)"]
    assert "compute saved" in panel(at) and not at.error
    at.selectbox(key="lab_method").set_value("Early exit")
    run(at)  # back to the method: its controls as the user left them
    assert at.slider(key="lab_exit_threshold_max_prob").value == 0.5
    assert at.text_input(key="lab_exit_prompt").value == "   " and len(at.warning) == 1  # the empty prompt's
    recipe = json.loads(lab_of(at).recipe.to_json())
    assert recipe["edits"][0] == {"type": "early_exit", "criterion": "max_prob", "threshold": 0.3, "lens": "logit"}
    recipe["edits"].append({"type": "quantize", "format": "int8"})

    other = run(load(run(new_app()), "zoo:code-lm"), PAGE)  # a new session applies the file
    upload(other, json.dumps(recipe))
    assert recipe_lines(other) == recipe_lines(at) + ["3. quantize int8 (all)"] and not other.error
    assert "compute saved" in panel(other) and panel(other)["size"] != panel(at)["size"]
    rows = lab_of(other).rows()
    assert rows[0]["compute_saved"] is None and rows[-1]["compute_saved"] > 0


def test_digits_cnn_exit_heads_images_and_accuracy():
    at = exit_page("zoo:digits-cnn")
    assert not at.radio(key="lab_exit_criterion").disabled
    assert any("exit heads" in c.value for c in at.caption)  # the only lens: no choice offered
    assert "saved (oracle)" not in controls(at)  # a classifier owes no keys and values
    titles = [a["text"] for a in chart(at, "lab_exit_images")["layout"]["annotations"]]
    assert len(titles) == 8 and all("predicts" in t and "label" in t for t in titles)
    base_accuracy = panel(at)["accuracy"]
    at.radio(key="lab_exit_criterion").set_value("patience")
    run(at)
    at.slider(key="lab_exit_threshold_patience").set_value(0)
    run(at)
    shown = controls(at)
    assert shown["mean exit layer (of 8)"] == "1.00" and percent(shown["agreement"]) < 100
    click(at, "lab_add")
    assert recipe_lines(at) == ["1. exit when argmax unchanged for 0 checks (exit heads)"]
    measured = panel(at)
    assert measured["accuracy"] != base_accuracy and measured["accuracy"] == shown["accuracy"]
    assert measured["top-1 agreement"] == shown["agreement"]
    assert measured["compute saved"] == shown["compute saved"] and not at.error


@pytest.mark.parametrize("threshold, message", [
    (9.0, "the entropy threshold lies in [0, 5.55]; 9.0 is outside it"),  # ln V on this model
    (-1.0, "The entropy threshold is >= 0 nats"),
])
def test_threshold_out_of_range_is_refused_and_the_recipe_kept(tiny_folder, threshold, message):
    at = exit_page(tiny_folder, typed=True)
    click(at, "lab_add")
    before = recipe_lines(at)
    recipe = json.loads(lab_of(at).recipe.to_json())
    recipe["edits"].append({"type": "early_exit", "criterion": "entropy", "threshold": threshold})
    upload(at, json.dumps(recipe))
    assert any(message in e.value for e in at.error), [e.value for e in at.error]
    assert recipe_lines(at) == before and len(before) == 1 and before[0].startswith("1. exit when")
    at.radio(key="lab_exit_criterion").set_value("max_prob")
    run(at)
    at.slider(key="lab_exit_threshold_max_prob").set_value(1.5)
    run(at)  # a slider cannot leave its range: streamlit keeps the value in it
    assert at.slider(key="lab_exit_threshold_max_prob").value <= 1.0


def test_tuned_lens_is_trained_once_on_request(tiny_folder, monkeypatch):
    from analysis import lens as exit_lens

    calls = []
    train = exit_lens.train_tuned_lens
    monkeypatch.setattr(exit_lens, "train_tuned_lens", lambda *a, **k: calls.append(1) or train(*a, **k))
    at = exit_page(tiny_folder, typed=True)
    at.radio(key="lab_exit_lens").set_value("tuned")
    run(at)
    assert "exit early" not in controls(at) and at.button(key="lab_add").disabled and not calls
    click(at, "lab_exit_train")
    assert calls == [1] and "exit early" in controls(at)
    assert not any("trained once" in i.value for i in at.info)  # the offer goes once trained
    at.radio(key="lab_exit_criterion").set_value("max_prob")
    run(at)
    at.slider(key="lab_exit_threshold_max_prob").set_value(0.2)
    run(at)
    click(at, "lab_add")
    assert recipe_lines(at) == ["1. exit when max prob ≥ 0.2 (tuned lens)"]
    assert "exit early" in controls(at) and not any(b.key == "lab_exit_train" for b in at.button)  # no new offer
    assert calls == [1] and panel(at)["compute saved"] == controls(at)["compute saved"]
    at.toggle(key="lab_exit_compare").set_value(True)
    run(at)
    assert any("The tuned lens reads closer to the final layer at" in c.value for c in at.caption)
    assert calls == [1] and not at.exception


@pytest.mark.parametrize("spec", ["zoo:code-lm", "zoo:digits-cnn"])
def test_the_default_exit_is_the_best_the_curves_offer_and_saves_compute(spec):
    at = exit_page(spec)
    shown = controls(at)
    assert percent(shown["compute saved"]) > 0 and percent(shown["agreement"]) >= 99
    assert any(c.value.startswith("Best through the") for c in at.caption)
    assert at.button(key="lab_exit_best").disabled  # the default is the best already
    at.slider(key=f"lab_exit_threshold_{at.radio(key='lab_exit_criterion').value}").set_value(0.0)
    run(at)
    assert not at.button(key="lab_exit_best").disabled
    click(at, "lab_exit_best")
    assert controls(at) == shown


def test_a_model_whose_exits_save_nothing_says_so():
    at = exit_page("zoo:induction-2l")  # the induction head needs what layer 0 wrote: no early answer
    assert any("No threshold of any criterion saves compute through the logit lens" in i.value for i in at.info)
    assert not at.exception


def test_another_model_gets_its_own_default_exit():
    at = exit_page("zoo:code-lm")
    at = load(at, "zoo:digits-cnn")
    at.selectbox(key="lab_method").set_value("Early exit")
    run(at)
    assert at.button(key="lab_exit_best").disabled  # the CNN's best, not code-lm's threshold carried over
    assert percent(controls(at)["agreement"]) >= 99 and not at.exception
