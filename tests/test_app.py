"""AppTest runs of every page on the bundled models, bad input, and session isolation."""

import pytest

from lib.models import load_model

from apptest_helpers import load, new_app, run


def texts(at):
    return [e.value for e in at.error]


def test_opens_on_default_model_with_metrics():
    at = run(new_app())
    assert at.session_state["load_request"].spec == "zoo:code-lm"
    assert at.title[0].value == "Model · zoo:code-lm"
    labels = {m.label for m in at.metric}
    assert {"perplexity", "bits per byte"} <= labels
    assert not texts(at)


@pytest.mark.parametrize("spec, label", [
    ("zoo:digits-cnn", "accuracy"),
    ("zoo:digits-denoiser", "PSNR (dB)"),
    ("zoo:induction-2l", "accuracy (repeated half)"),
])
def test_every_zoo_model_opens_on_the_model_page(spec, label):
    at = load(run(new_app()), spec)
    assert at.title[0].value == f"Model · {spec}"
    assert label in {m.label for m in at.metric}
    assert at.expander[0].label.startswith("Model card")  # the bundled model's MODEL_CARD.md
    if spec == "zoo:induction-2l":  # attention-only: no MLP width to show
        assert "d_mlp" not in list(at.table[0].value["property"])
    assert at.session_state["zoo_choice"] == spec  # the list shows what is loaded
    assert not texts(at)


def test_denoiser_psnr_is_shown_beside_its_noisy_inputs_own():
    from lib import data
    from lib.metrics import input_psnr_db

    at = load(run(new_app()), "zoo:digits-denoiser")
    shown = {m.label: m.value for m in at.metric}
    noisy = input_psnr_db(data.default_batch(load_model("zoo:digits-denoiser")))
    assert shown["PSNR of the noisy input"] == f"{noisy:.4g}" and float(shown["PSNR (dB)"]) > noisy + 3
    lab = run(at, "views/lab.py")
    assert {m.label: m.value for m in lab.metric}["PSNR of the noisy input"] == f"{noisy:.2f}"


def test_model_page_latency_has_its_interval_and_can_be_timed_again():
    at = run(new_app())
    latency = next(m for m in at.metric if m.label == "latency")
    assert latency.value.endswith(" ms") and "95 % interval of the median" in latency.help
    before = next(c.value for c in at.caption if "Latency measured at" in c.value)
    at.button(key="model_time_again").click()
    run(at)
    assert at.session_state["latency_attempt_zoo:code-lm"] == 1
    assert any("Latency measured at" in c.value for c in at.caption) and before
    assert not texts(at)


def test_the_model_page_times_a_slow_model_without_a_whole_batch_forward(monkeypatch):
    """One row gives the pace; a model too slow to time whole is timed on the rows that fit,
    with no untimed forward of the whole batch first (the page's longest wait, once)."""
    from lib import latency, metrics
    from ui.cache import base_outputs, batch_key, eval_batch
    from ui.model import base_latency
    from ui.session import LoadRequest, load_base
    from ui.store import STORE

    handle = load_base(LoadRequest("zoo:code-lm"))
    rows, seen = len(metrics.model_inputs(eval_batch(handle))), []
    STORE._items.pop(("base_forward_seconds", *batch_key(handle)), None)  # the base's forward not run here
    forward = type(handle).forward
    monkeypatch.setattr(type(handle), "forward", lambda self, x: (seen.append(len(x)), forward(self, x))[1])
    monkeypatch.setattr(latency, "LATENCY_BUDGET_SECONDS", 0.0)  # nothing fits: the fewest rows are timed
    timing, _ = base_latency(handle, attempt=1_000)
    assert timing.rows == 1 and rows > 1 and set(seen) == {1}, seen
    monkeypatch.setattr(latency, "LATENCY_BUDGET_SECONDS", 1e9)  # everything fits: one untimed whole run first
    seen.clear()
    timing, _ = base_latency(handle, attempt=1_001)
    assert timing.rows == rows and seen[:2] == [1, rows] and set(seen[2:]) == {rows}, seen
    base_outputs(handle)  # the Model page's forward, which the timing is then sized from: nothing paces it
    STORE.put(("base_forward_seconds", *batch_key(handle)), 1e9)  # as if it had taken forever: the fewest tokens
    monkeypatch.setattr(latency, "LATENCY_BUDGET_SECONDS", 3.0)
    seen.clear()
    timing, _ = base_latency(handle, attempt=1_002)
    assert (timing.rows, timing.positions) == (1, latency.MIN_TIMED_POSITIONS) and set(seen) == {1}, seen


def test_unknown_words_are_named_next_to_the_prediction():
    at = load(run(new_app()), "zoo:induction-2l")
    at.text_area[0].input("t5 t9 hello t5 你好")
    run(at)
    assert any("hello" in w.value and "你好" in w.value for w in at.warning)


def test_pickle_refusal_names_the_checkbox(tmp_path):
    from conftest import save_tiny_gpt2

    save_tiny_gpt2(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")  # only "pickled" weights
    at = load(run(new_app()), str(tmp_path), typed=True)
    assert any('"Allow pickled checkpoints" box under "Loading options"' in e.value for e in at.sidebar.error)
    assert at.session_state["load_request"].spec == "zoo:code-lm"


def test_local_folder_loads_through_the_sidebar(tiny_gpt2_dir):
    at = load(run(new_app()), str(tiny_gpt2_dir), typed=True)
    assert at.session_state["load_request"].spec == str(tiny_gpt2_dir)
    assert "perplexity" in {m.label for m in at.metric}
    assert at.session_state["zoo_choice"] is None  # the list no longer claims a bundled model
    assert f"Loaded: **{tiny_gpt2_dir}**" in " ".join(c.value for c in at.sidebar.caption)


def _bad_folder(kind: str, tmp_path) -> str:
    """A GPT-2 folder broken the way a user's might be (see tests/test_loading_corpus.py)."""
    import json

    from conftest import save_tiny_gpt2

    save_tiny_gpt2(tmp_path)
    if kind == "no tokenizer":
        for f in tmp_path.glob("tokenizer*"):
            f.unlink()
    elif kind == "config not JSON":
        (tmp_path / "config.json").write_text("{n_layer: 3,")
    elif kind == "more layers than weights":
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 5}))
    return str(tmp_path)


@pytest.mark.parametrize("spec, message", [
    ("/no/such/folder", "does not exist"),
    ("zoo:nope", "no bundled model"),
    ("bad name !!", "not a bundled model"),
    ("no tokenizer", "has no tokenizer"),
    ("config not JSON", "is not valid JSON"),
    ("more layers than weights", "missing"),
])
def test_bad_model_input_keeps_the_loaded_model(spec, message, tmp_path):
    at = run(new_app())
    at.text_area[0].input("import sys\n")  # the user's prompt survives the failed load
    run(at)
    if " " in spec and not spec.startswith("bad"):
        spec = _bad_folder(spec, tmp_path)
    at = load(at, spec, typed=True)
    assert any(message in t for t in texts(at) + [e.value for e in at.sidebar.error])
    assert not at.exception
    assert at.session_state["load_request"].spec == "zoo:code-lm"
    assert at.title[0].value == "Model · zoo:code-lm"
    assert at.text_area[0].value == "import sys\n"


def test_empty_and_long_prompts_get_messages():
    at = run(new_app())
    at.text_area[0].input("   ")
    run(at)
    assert any("empty" in t for t in texts(at))
    at.text_area[0].input("x = 1\n" * 100)
    run(at)
    assert any("dropped" in i.value for i in at.info)


def test_two_sessions_never_change_the_base_model():
    base = load_model("zoo:code-lm")
    first, second = run(new_app()), run(new_app())
    first.text_area[0].input("import os\n")
    run(first)
    load(second, "zoo:digits-cnn")
    from ui.session import load_base

    for at in (first, second):
        handle = load_base(at.session_state["load_request"])
        assert handle.current_fingerprint() == handle.fingerprint
    assert load_base(first.session_state["load_request"]).fingerprint == base.fingerprint


def test_redundancy_page_on_default_model_sends_drops_to_recipe():
    at = run(run(new_app()), "views/redundancy.py")
    assert at.title[0].value == "Layer redundancy"
    subheaders = [s.value for s in at.subheader]
    for expected in ("How much each layer changes the residual stream", "What dropping one module really costs",
                     "How alike the layers are", "Logit lens: what each depth would predict", "Depth effect",
                     "Drop several modules"):
        assert expected in subheaders
    assert len(at.get("plotly_chart")) == 6
    at.slider[0].set_value(3)
    run(at)
    labels = [m.label for m in at.metric]
    assert "predicted Δ bits per byte" in labels and "measured Δ bits per byte" in labels
    next(b for b in at.button if b.label.startswith("Add these 3 drops")).click()
    run(at)
    assert "the recipe now has 3 edit(s)" in at.success[0].value
    recipe = next(iter(at.session_state["labs"].values())).recipe  # the session's lab owns the recipe
    assert len(recipe.edits) == 3
    assert not texts(at)


def test_redundancy_page_announces_the_sweep_from_its_measured_forward(monkeypatch, tmp_path):
    """Before a step expected to take over ESTIMATE_FROM_S the page says how long, from a
    measured forward (here the Model page's, which recorded the pass the page reads; the bound
    is lowered so a tiny model's seconds qualify; a folder of its own, with weights of its own:
    a tiny GPT-2 another test in this process swept has the same fingerprint, and its cached
    sweep would hide the announcement)."""
    import ui.redundancy
    from analysis.redundancy.drops import sweep_in_forwards
    from lib.data import default_batch

    from conftest import save_tiny_gpt2

    monkeypatch.setattr(ui.redundancy, "ESTIMATE_FROM_S", 0.0)
    save_tiny_gpt2(tmp_path, seed=194)
    at = run(load(run(new_app()), str(tmp_path), typed=True), "views/redundancy.py")
    said = [c.value for c in at.caption if c.value.startswith("Measuring every drop: about ")]
    assert len(said) == 1 and "forward passes (one took" in said[0], said
    handle = load_model(str(tmp_path))
    forwards = sweep_in_forwards(handle, default_batch(handle).tokens.shape[1])
    assert 1 < forwards < 3 * handle.structure.n_layers  # 3L single drops, each rerunning part of the model
    assert f"the work of {forwards:.0f} forward passes" in said[0]
    assert not texts(at)


def test_redundancy_page_on_cnn_explains_stages_that_cannot_be_dropped():
    at = load(run(new_app()), "zoo:digits-cnn")
    run(at, "views/redundancy.py")
    captions = [c.value for c in at.caption]
    assert sum("cannot be bypassed" in c for c in captions) == 1  # one sentence, not one line per stage
    cka = next(c for c in captions if "linear CKA" in c)
    assert "between stages" in cka and "depths" not in cka  # named like the heat map's axes
    assert "hover for KL" in " ".join(captions)
    assert not texts(at)


def test_redundancy_page_on_denoiser_offers_no_kl():
    at = load(run(new_app()), "zoo:digits-denoiser")
    run(at, "views/redundancy.py")
    assert "hover for KL" not in " ".join(c.value for c in at.caption)  # a denoiser has no distribution
    assert "KL to base (measured)" not in [m.label for m in at.metric]
    assert not at.radio  # one stage can be dropped: nothing to rank
    assert not texts(at)


def test_redundancy_terms_have_tooltips_from_the_glossary():
    from ui.glossary import GLOSSARY

    at = run(run(new_app()), "views/redundancy.py")
    helps = {s.value: s.proto.help for s in at.subheader}
    assert GLOSSARY["one_minus_cos"] in helps["How much each layer changes the residual stream"]
    assert GLOSSARY["cka"] in helps["How alike the layers are"]
    assert GLOSSARY["logit_lens"] in helps["Logit lens: what each depth would predict"]
    assert GLOSSARY["drop"] in helps["What dropping one module really costs"]
    assert GLOSSARY["attention_sink"] in at.number_input[0].help


def test_redundancy_page_on_attention_only_model_has_no_duplicate_granularity():
    at = load(run(new_app()), "zoo:induction-2l")
    run(at, "views/redundancy.py")
    assert [r.label for r in at.radio] == ["Rank by"]  # sublayers and blocks are the same thing here
    assert sum(c.value.startswith("mlp 0, mlp 1: ") for c in at.caption) == 1  # one line for both missing MLPs
    assert not any(c.value.startswith("mlp 1: ") for c in at.caption)
    assert not texts(at)


def test_redundancy_page_on_one_layer_model_says_why(tmp_path):
    from conftest import save_tiny_gpt2

    save_tiny_gpt2(tmp_path, n_layer=1)
    at = load(run(new_app()), str(tmp_path), typed=True)
    run(at, "views/redundancy.py")
    assert any("at least 2" in t for t in texts(at))


def test_the_sidebar_loads_in_the_precision_chosen(tmp_path):
    """Loading options: the precision chosen applies to the next model loaded, and the
    model card says where and in what precision the model runs."""
    import torch

    from tools.families import save_tiny

    at = run(new_app())
    assert at.selectbox(key="load_device").options[0] == "auto"
    at.selectbox(key="load_dtype").set_value("bfloat16")
    at = load(run(at), str(save_tiny("llama", tmp_path / "llama")), typed=True)  # a float32 checkpoint
    card = dict(zip(at.table[0].value["property"], at.table[0].value["value"]))
    assert card["runs on"] == "cpu · bfloat16" and not texts(at)
    at.selectbox(key="load_dtype").set_value("auto")
    at = load(run(at), str(save_tiny("gpt2", tmp_path / "gpt2", dtype=torch.bfloat16)), typed=True)
    assert dict(zip(at.table[0].value["property"], at.table[0].value["value"]))["runs on"] == "cpu · bfloat16"
