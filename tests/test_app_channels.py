"""AppTest runs of the Channels page: the induction circuit found and cut on
zoo:induction-2l, the default code model, the rotary note, an image model refused."""

from test_channels import save_tiny_llama

from apptest_helpers import load, new_app, run


def channels_page(spec=None, typed=False):
    at = run(new_app())
    if spec is not None:
        at = load(at, spec, typed=typed)
    return run(at, "views/channels.py")


def captions(at):
    return " ".join(c.value for c in at.caption)


def metrics(at):
    return {m.label: m.value for m in at.metric}


def percent(shown: str) -> float:
    """"98.4%" -> 0.984: accuracy reads as a percentage, as on the Model page and in the lab."""
    assert shown.endswith("%"), shown
    return float(shown[:-1]) / 100


def test_induction_circuit_is_shown_and_cutting_it_breaks_induction():
    at = channels_page("zoo:induction-2l")
    assert not at.error
    assert at.radio(key="mode_zoo:induction-2l").value == "K"  # the strongest channel of any mode
    pair = at.selectbox(key="pair_zoo:induction-2l_K")
    assert pair.format_func(pair.value).startswith("L0H0 → L1H2 (K)")
    assert "Induction circuit: the strongest K-composition, L0H0 → L1H2" in captions(at)
    assert at.selectbox(key="head_zoo:induction-2l_L0H0 → L1H2 (K)").format_func(6) == "L1H2"  # the reader
    shown = metrics(at)
    assert percent(shown["accuracy before"]) > 0.95 and percent(shown["accuracy after"]) < 0.2  # the head cut
    after = next(m for m in at.metric if m.label == "accuracy after")
    assert after.delta.endswith(" points") and "evaluation set" in after.help and "not on your prompt" in after.help
    assert "on the evaluation set: accuracy " in captions(at) and "% → " in captions(at)
    assert "Orange heads have a role (previous-token ≥ 0.5, duplicate-token ≥ 0.3, induction ≥ 0.3)" in captions(at)
    at.slider(key="alpha_zoo:induction-2l").set_value(1.0)
    run(at)
    assert not at.error, [e.value for e in at.error]
    assert metrics(at)["accuracy after"] == metrics(at)["accuracy before"]  # alpha 1 changes nothing
    at.radio(key="scope_zoo:induction-2l").set_value("components")
    at.slider(key="alpha_zoo:induction-2l").set_value(0.0)
    run(at)
    one = percent(metrics(at)["accuracy after"])
    at.slider(key="k_zoo:induction-2l_L0H0 → L1H2 (K)").set_value(10)
    run(at)
    assert percent(metrics(at)["accuracy after"]) < one  # more of the channel's directions cut, less induction
    assert not at.exception and not at.error


def test_default_code_model_says_what_it_finds():
    at = channels_page()
    assert not at.error and not at.info  # GPT-2: exact scores, no note
    text = captions(at)
    assert "Strongest" in text and "Regimes:" in text and "directions of" in text
    assert "bits per byte before" in metrics(at)
    from ui.glossary import GLOSSARY

    helps = {h.value: h.proto.help for h in at.subheader}
    assert GLOSSARY["head_roles"] in helps["What each head does"]
    assert GLOSSARY["composition"] in helps["Which heads talk to which"]
    assert GLOSSARY["attention_pattern"] in helps["Attention on your prompt"]


def test_rotary_grouped_model_shows_the_note(tmp_path):
    save_tiny_llama(tmp_path)
    at = channels_page(str(tmp_path), typed=True)
    assert not at.error
    notes = " ".join(i.value for i in at.info)
    assert "rotary" in notes and "grouped-query" in notes


def test_image_model_is_refused_in_words():
    at = channels_page("zoo:digits-cnn")
    assert not at.error and any("no attention heads" in i.value for i in at.info)  # not an error of the user's
    assert at.session_state["load_request"].spec == "zoo:digits-cnn"


def test_circuits_kept_from_a_model_since_let_go_are_read_from_the_one_loaded_now():
    """The store keeps circuits by fingerprint; the models' cache can let their model go and
    load the same weights again (a busy shared server): the page then reads the new one."""
    import gc

    from analysis.channels.circuits import channel_components
    from lib.models import load_model
    from ui import channels

    first = load_model("zoo:induction-2l")
    channels.circuits(first)
    again = load_model("zoo:induction-2l")
    assert again.fingerprint == first.fingerprint and again is not first
    del first
    gc.collect()
    c = channels.circuits(again)
    pair = channels.composition(again).strongest("K", 1)[0]
    assert channel_components(c, channels.composition(again), pair.writer, pair.reader, "K").shares.numel() > 0
