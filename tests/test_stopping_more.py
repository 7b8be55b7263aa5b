"""Every long step can be stopped (issue 25), continued: re-measuring a recipe on a resized
batch, head roles, the lab's internals, the probes, the weights across depth and captum; the bars of steps that run
several forwards, of the int8 kernel's timing, of the bits allocation and of the probes
move forward only; a readout check before the real forward tells no bar."""

import pytest
from test_stopping import _redundancy_page, _the_one_computed

from lib import data
from lib.hooks import count_hooks
from ui.cache import batch_key
from ui.progress import STOPPED
from ui.store import STORE

from apptest_helpers import run


def _lab_with_a_drop():
    """The Compression lab on zoo:code-lm, its recipe one block drop: (app, model, lab)."""
    from analysis.compress.prune.pruning import Drop

    at, handle = _redundancy_page()
    at = run(at, "views/lab.py")
    lab = next(iter(at.session_state["labs"].values()))
    recipe = lab.recipe
    recipe.add(Drop("block", 1))
    lab.apply(recipe)
    return at, handle, lab

def test_a_stop_while_the_recipe_is_carried_to_a_resized_batch_leaves_that_lab_at_the_base(monkeypatch):
    """Resizing the evaluation batch re-measures the recipe on it, under a bar with a Stop: a
    stop keeps the new batch's lab at the base model (no second measurement of the base, no
    second try) and the recipe in the previous batch's lab."""
    import streamlit as st

    from analysis.compress.lab import Lab
    from ui.cache import auto_windows

    at, handle, old = _lab_with_a_drop()
    at.session_state["eval_windows"] = {handle.fingerprint: auto_windows(handle) + 1}  # as the box's callback does
    made, carried = [], []
    real_init, real_apply = Lab.__init__, Lab.apply

    def init(self, *a, **k):
        made.append(self)
        real_init(self, *a, **k)

    def apply(self, recipe, progress=None):  # the visitor's Stop, at the carried recipe's first update
        carried.append(self)
        st.stop()

    monkeypatch.setattr(Lab, "__init__", init)
    monkeypatch.setattr(Lab, "apply", apply)
    at = run(at)
    assert len(made) == 1 and carried == made
    labs = at.session_state["labs"]
    assert len(labs) == 2 and labs[next(k for k in labs if labs[k] is old)].current.edits
    assert not made[0].current.edits
    monkeypatch.setattr(Lab, "apply", real_apply)
    at = run(at)
    assert len(made) == 1 and not at.error  # the new batch's lab, as it was left: not made or carried again
    assert at.session_state["labs"][next(k for k in labs if labs[k] is made[0])] is made[0]


def test_stopped_head_roles_show_their_notice_and_nothing_that_reads_them_then_go_on():
    at, handle = _redundancy_page()
    key = ("channels.roles", *batch_key(handle))
    run(at, "views/channels.py")  # the circuits and scores the page reads first
    STORE._items.pop(key, None)
    at.session_state[STOPPED] = {key}
    at = run(at)
    assert [i.value for i in at.info if "stopped" in i.value] == [
        "Recording every head's attention on a repeated-token probe: stopped. Nothing of it is kept; going on "
        "starts it again."]
    assert not at.subheader and not at.error
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("go_on_"))).click()
    at = run(at)
    assert STORE.get(key) is not None and any(h.value == "What each head does" for h in at.subheader)


def test_a_stopped_reading_of_the_lab_models_internals_shows_its_notice_then_goes_on():
    from analysis.compress import compare as cmp

    at, handle, lab = _lab_with_a_drop()
    key = ("compare_depth", handle.fingerprint, cmp.internal_batch(lab.batch).digest)
    STORE._items.pop(key, None)
    at.session_state[STOPPED] = {key}
    at = run(at)
    assert [i.value for i in at.info if "stopped" in i.value] == [
        "Reading the base model's internals: stopped. Nothing of it is kept: going on reads it again."]
    assert not at.error and not any("Head roles" in m.value for m in at.markdown)
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("go_on_"))).click()
    at = run(at)
    assert STORE.get(key) is not None and any("Head roles, base and edited" in m.value for m in at.markdown)


def test_steps_of_several_forwards_tell_each_one(family_handles):
    """The bar of a step that runs several forwards moves over all of them (a known number),
    or forward by forward; the int8 kernel's timing and the bits allocation report theirs."""
    from analysis.compress.quant.kernels import int8_kernel_comparison
    from analysis.compress.quant.mixed_precision import allocate, sensitivity
    from ui.progress import counting_blocks

    handle = family_handles["gpt2"]
    batch = data.code_batch(handle.tokenizer, seq_len=12, n_windows=2)
    L = handle.structure.n_layers
    copy = handle.private_copy()
    for forwards, last in ((2, (1.0, "forward 2 of 2")), (None, (1.0, f"forward 2: {L} of {L} blocks"))):
        told = []
        with counting_blocks((handle, copy), lambda f, m: told.append((f, m)), forwards):
            handle.forward(batch.tokens)
            copy.forward(batch.tokens)  # a step that runs the base, then an edited copy
        assert len(told) == 2 * L and told[-1] == last
        assert forwards is None or [f for f, _ in told] == sorted(f for f, _ in told)
    assert count_hooks(handle.model) == 0 and count_hooks(copy.model) == 0

    told = []
    kernel = int8_kernel_comparison(handle, batch, repeats=2, progress=lambda f, m: told.append((f, m)))
    assert [m for _, m in told] == [f"{k} of 6 forwards" for k in range(2, 7)] and told[-1][0] == 1.0
    assert kernel.repeats == 2
    told = []
    sens = sensitivity(handle, batch, "int4")
    plan = allocate(handle, batch, sens, "int4", "int8", max_drop=1e9, progress=lambda f, m: told.append((f, m)))
    assert len(told) == plan.evaluations and all(0 <= f < 1 for f, _ in told)


@pytest.mark.parametrize("page, step, notice, after", [
    ("views/representations.py", "representations.probes",
     "Linear probes: stopped. Nothing of it is kept: going on probes again.", "Weights across depth"),
    ("views/representations.py", "representations.depth", "Fitting every weight family across depth: stopped. "
                                                           "Nothing of it is kept: going on fits again.",
     "Weights across depth"),
    ("views/interpreter.py", "interpreter_token_captum",
     "captum attributions: stopped. Nothing of it is kept: going on runs it again.", "captum beside the exact "
                                                                                     "contributions"),
])
def test_stopped_probes_depth_fit_and_captum_show_their_notice_and_the_page_around_them_then_go_on(page, step, notice,
                                                                                                    after):
    at, handle = _redundancy_page()
    key = _the_one_computed(at, handle, page, step)
    at.session_state[STOPPED] = {key}
    at = run(at)
    assert [i.value for i in at.info if "stopped" in i.value] == [notice] and not at.error
    assert after in [h.value for h in at.subheader]  # what does not read the stopped step is drawn
    assert not at.table  # captum's table reads it (the probes page draws none)
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("go_on_"))).click()
    at = run(at)
    assert STORE.get(key) is not None and not [i for i in at.info if "stopped" in i.value]


def test_the_probes_bar_moves_with_the_recorded_pass_then_with_the_fits():
    """The recorded pass is most of the probes' time: its blocks move the bar to
    RECORDING_SHARE, the fits at each depth the rest (an estimate from the pace holds)."""
    from analysis.representations.probes import RECORDING_SHARE, probe_layers
    from lib.models import load_model

    handle = load_model("zoo:code-lm")
    told = []
    probe_layers(handle, progress=lambda f, m: told.append((f, m)))
    L = handle.structure.n_layers
    fractions = [f for f, _ in told]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert told[L] == (pytest.approx(RECORDING_SHARE), f"recording the residual stream: {L} of {L} blocks")
    assert len(told) == 1 + L + (L + 1) and count_hooks(handle.model) == 0


def test_outputs_read_out_a_chunk_at_a_time_tell_the_blocks_of_their_one_real_forward(family_handles, monkeypatch):
    """Large logits come back as a `ReadLogits`, after a 16-token check of the readout: the
    bar counts the real forward's blocks alone, once (it ran three times before)."""
    from lib.scoring import ReadLogits

    monkeypatch.setattr("lib.lm_handle.HELD_LOGITS_BYTES", 0)
    handle = family_handles["gpt2"]
    inputs = data.code_batch(handle.tokenizer, seq_len=24, n_windows=2).tokens
    told, L = [], handle.structure.n_layers
    with handle.told_of_blocks(lambda k, n: told.append(k)):
        assert isinstance(handle.outputs(inputs), ReadLogits)
    assert told == list(range(1, L + 1))
