"""Every long step can be stopped (issue 25): the logit lens keeps the token chunks it has
read and goes on to the same numbers; a stopped step shows a notice with a button that goes
on, and the page draws what does not need it; the drop sweep stopped before its first
module says so and draws nothing after it; a lab method whose step was stopped adds nothing;
the hooked pass and the Model page's forward report each block, and a stop ends them with no
hook or lock left behind."""

import pytest
import torch

from analysis import lens
from analysis.redundancy.similarity import collect_residuals
from lib import data
from lib.hooks import count_hooks
from lib.points import Point
from ui.cache import batch_key, eval_batch
from ui.progress import STOPPED
from ui.store import STORE

from apptest_helpers import new_app, run


class _Stop(Exception):
    pass


def test_a_stopped_lens_keeps_its_chunks_and_goes_on_to_the_same_numbers(tiny_lm, monkeypatch):
    batch = data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=3)
    res = collect_residuals(tiny_lm, batch, skip=1, with_logits=True)
    monkeypatch.setattr(lens, "LENS_CHUNK_ELEMENTS", 20 * tiny_lm.structure.d_vocab)  # 20 tokens a chunk: 4 chunks
    whole = lens.logit_lens(tiny_lm, res)
    L = tiny_lm.structure.n_layers
    seen = []

    def stop_in_the_third_chunk(fraction, message):
        seen.append(fraction)
        if len(seen) == 2 * L + 1:
            raise _Stop

    so_far = {}
    with pytest.raises(_Stop):
        lens.logit_lens(tiny_lm, res, progress=stop_in_the_third_chunk, so_far=so_far)
    assert so_far["state"][0] == 2  # the chunk it was in when stopped is not counted
    went_on = []
    resumed = lens.logit_lens(tiny_lm, res, progress=lambda f, m: went_on.append(f), so_far=so_far)
    assert len(went_on) == 2 * L  # only the two chunks left
    for name in ("kl", "agreement", "entropy"):
        assert torch.allclose(getattr(resumed, name), getattr(whole, name), rtol=1e-5, atol=1e-7), name
    other = collect_residuals(tiny_lm, batch, skip=3, with_logits=True)  # another skip: other tokens
    so_far, seen[:] = {}, []
    with pytest.raises(_Stop):
        lens.logit_lens(tiny_lm, res, progress=stop_in_the_third_chunk, so_far=so_far)
    not_mixed = lens.logit_lens(tiny_lm, other, so_far=so_far)  # what was kept for skip 1 is not used
    assert torch.allclose(not_mixed.agreement, lens.logit_lens(tiny_lm, other).agreement)
    assert float(not_mixed.agreement[-1]) == 1.0  # every token counted once at the output


def _stop_on(call: int, seen: list):
    def progress(fraction, message):
        seen.append((fraction, message))
        if len(seen) == call:
            raise _Stop

    return progress


def _torch_hooks(handle) -> tuple[int, int]:
    """The bridge's hooks (OPT's keeps permanent ones of its own) and the plain model's torch hooks."""
    plain = handle.plain_model().modules()
    return count_hooks(handle.model), sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in plain)


def _nothing_left(handle, hooks_before: tuple[int, int]) -> None:
    assert _torch_hooks(handle) == hooks_before
    assert handle.lock.acquire(blocking=False)  # another thread could take it: the stopped pass let go
    handle.lock.release()


@pytest.mark.parametrize("hooked", [False, True], ids=["plain path", "bridge hooks"])
def test_the_hooked_pass_reports_each_block_and_a_stop_leaves_nothing_behind(family_handles, hooked):
    for name, handle in family_handles.items():
        batch = data.code_batch(handle.tokenizer, seq_len=12, n_windows=2)
        whole = collect_residuals(handle, batch, skip=0, with_logits=False)
        hooks_before = _torch_hooks(handle)
        L, seen = handle.structure.n_layers, []
        with handle.hooks([(Point("resid_pre", 0), lambda t: None)] if hooked else []):
            res = collect_residuals(handle, batch, skip=0, with_logits=False, progress=_stop_on(0, seen))
            stopped = []
            with pytest.raises(_Stop):
                collect_residuals(handle, batch, skip=0, with_logits=False, progress=_stop_on(3, stopped))
        _nothing_left(handle, hooks_before)
        assert torch.allclose(res.resid, whole.resid, rtol=1e-4, atol=1e-6), name  # the bridge's path is another path
        assert torch.allclose(res.mid, whole.mid, rtol=1e-4, atol=1e-6), name
        fractions = [f for f, _ in seen]
        assert len(seen) == 2 * L + 1 and fractions == sorted(fractions) and fractions[-1] == 1, (name, seen)
        assert seen[-1][1] == f"{L} of {L} blocks", name
        again = collect_residuals(handle, batch, skip=0, with_logits=False)
        assert torch.allclose(again.resid, whole.resid, rtol=1e-4, atol=1e-6), name


def test_a_stopped_hooked_pass_shows_its_notice_alone_then_goes_on_to_the_page():
    at, handle = _redundancy_page()
    key = ("residuals", *batch_key(handle))
    for part in [k for k in STORE._items if k[:1] in {("residuals",), ("layer_statistics",), ("lens",),
                                                         ("drop_sweep",)}]:
        STORE._items.pop(part)
    at.session_state[STOPPED] = {key}
    at = run(at, "views/redundancy.py")
    assert [i.value for i in at.info if "stopped" in i.value] == [
        "One forward pass with hooks: stopped. Nothing of a pass is kept: going on runs it again. "
        "Every part of this page reads it."]
    assert not at.error and not at.subheader and STORE.get(key) is None  # nothing that reads it is drawn
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("go_on_"))).click()
    at = run(at)
    assert not [i for i in at.info if "stopped" in i.value] and STORE.get(key) is not None
    assert any("What dropping one module really costs" in h.value for h in at.subheader)


def _redundancy_page():
    from ui.session import LoadRequest, load_base

    at = run(new_app())
    return at, load_base(LoadRequest("zoo:code-lm"))


def test_a_stopped_lens_shows_its_notice_and_the_rest_of_the_page_then_goes_on():
    at, handle = _redundancy_page()
    key = ("lens", *batch_key(handle), 4)
    STORE._items.pop(key, None)
    at.session_state[STOPPED] = {key}
    at = run(at, "views/redundancy.py")
    assert [i.value for i in at.info if "stopped" in i.value] == [
        "Logit lens: stopped. The tokens it has read are kept; going on reads the rest."]
    assert STORE.get(key) is None
    assert any("What dropping one module really costs" in h.value for h in at.subheader)  # the page went on
    assert any("Each bar removes one module" in c.value for c in at.caption)
    assert not any("unembedding" in c.value for c in at.caption)  # the lens's own caption is not drawn
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("go_on_"))).click()
    at = run(at)
    assert not [i for i in at.info if "stopped" in i.value] and STORE.get(key) is not None
    assert any("unembedding" in c.value for c in at.caption)


def test_a_sweep_stopped_before_its_first_module_says_so_and_measures_on_request():
    at, handle = _redundancy_page()
    at = run(at, "views/redundancy.py")
    key = ("drop_sweep", *batch_key(handle))
    STORE._items.pop(key)
    STORE.put(key + ("so far",), {})  # stopped before the base was measured
    at.session_state[STOPPED] = {key}
    at = run(at)
    assert [i.value for i in at.info if "stopped" in i.value] == [
        "The drop sweep was stopped before it had measured any module."]
    assert not any("Each bar removes one module" in c.value for c in at.caption)  # nothing below the notice
    assert not any(h.value == "Drop several modules" for h in at.subheader)
    at.button(key="redundancy_resume_sweep").click()
    at = run(at)
    assert STORE.get(key) is not None and any("Each bar removes one module" in c.value for c in at.caption)


def test_a_lab_method_whose_step_was_stopped_adds_nothing_and_can_go_on():
    from ui.lab.exits import exit_pass_key
    from ui.session import LoadRequest, load_base

    at = run(new_app())
    handle = load_base(LoadRequest("zoo:code-lm"))
    at = run(at, "views/lab.py")
    at.selectbox(key="lab_method").set_value("Early exit")
    key = exit_pass_key(handle, handle, "logit")
    STORE._items.pop(key, None)
    at.session_state[STOPPED] = {key}
    at = run(at)
    assert [i.value for i in at.info if "stopped" in i.value] == [
        "Recording every layer's readout: stopped. Nothing of it is kept; going on records it from the start."]
    assert at.button(key="lab_add").disabled
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("go_on_"))).click()
    at = run(at)
    assert STORE.get(key) is not None and not at.button(key="lab_add").disabled
    assert eval_batch(handle).digest == key[2]


def test_stopped_channels_show_their_notice_and_nothing_that_reads_them_then_go_on():
    from ui.session import LoadRequest, load_base

    at = run(new_app())
    handle = load_base(LoadRequest("zoo:code-lm"))
    key = ("channels.circuits", handle.fingerprint)
    STORE._items.pop(key, None)
    at.session_state[STOPPED] = {key}
    at = run(at, "views/channels.py")
    assert [i.value for i in at.info if "stopped" in i.value] == [
        "Reading every head's OV and QK circuit from the weights: stopped. Nothing of it is kept; going on starts it "
        "again."]
    assert not at.subheader  # every section reads the circuits
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("go_on_"))).click()
    at = run(at)
    assert STORE.get(key) is not None and any(h.value == "What each head does" for h in at.subheader)


def test_one_forward_tells_each_block_keeps_its_plain_path_and_a_stop_leaves_nothing_behind(family_handles):
    for name, handle in family_handles.items():
        inputs = data.code_batch(handle.tokenizer, seq_len=12, n_windows=2).tokens
        whole = handle.forward(inputs)
        hooks_before, L, told = _torch_hooks(handle), handle.structure.n_layers, []
        with handle.told_of_blocks(lambda k, n: told.append((k, n))):
            assert count_hooks(handle.model) == hooks_before[0]  # the bridge sees none: the plain path runs
            out = handle.forward(inputs)
            with handle.hooks([(Point("resid_pre", 0), lambda t: None)]):  # the bridge's path tells too
                handle.forward(inputs)
        assert told == [(k, L) for k in range(1, L + 1)] * 2, name
        assert torch.equal(out, whole), name  # the same path, the same numbers
        with pytest.raises(_Stop):
            with handle.told_of_blocks(lambda k, n: _raise_at(k, 2)):
                handle.forward(inputs)
        _nothing_left(handle, hooks_before)


def _raise_at(k: int, block: int) -> None:
    if k == block:
        raise _Stop


def test_a_stopped_model_run_shows_its_notice_in_place_of_the_baseline_then_goes_on():
    at, handle = _redundancy_page()
    key = ("base_outputs", *batch_key(handle))
    STORE._items.pop(key, None)
    at.session_state[STOPPED] = {key}
    at = run(at, "views/model.py")
    assert [i.value for i in at.info if "stopped" in i.value] == [
        "Running the model on its evaluation set: stopped. Nothing of the run is kept: going on runs it again."]
    assert not at.error and not at.metric and STORE.get(key) is None  # no number that reads it
    assert any(h.value == "Next-token prediction" for h in at.subheader)  # the rest of the page is drawn
    assert at.number_input(key=f"eval_windows_{handle.fingerprint}")  # the batch size can still be changed
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("go_on_"))).click()
    at = run(at)
    assert not [i for i in at.info if "stopped" in i.value] and STORE.get(key) is not None
    assert {"bits per byte", "latency"} <= {m.label for m in at.metric}


def test_the_labs_measurement_of_the_base_tells_its_steps_and_a_stopped_one_shows_its_notice_then_goes_on():
    from analysis.compress.lab import Lab

    at, handle = _redundancy_page()
    told = []
    Lab(handle, eval_batch(handle), progress=lambda f, m: told.append((f, m)))
    stages = list(dict.fromkeys(m.partition(":")[0] for _, m in told))
    assert stages == ["its outputs", "timing it", "scoring it"]
    assert {m for _, m in told if m.startswith("timing")} >= {f"timing it: timed forward {k} of 6" for k in (1, 6)}
    n = len(eval_batch(handle).tokens)
    assert told[-1] == (1.0, f"scoring it: window {n} of {n}")  # the scoring tells every window
    assert [f for f, _ in told] == sorted(f for f, _ in told)
    key = ("lab", *batch_key(handle))
    at.session_state[STOPPED] = {key}
    at = run(at, "views/lab.py")
    assert [i.value for i in at.info if "stopped" in i.value] == [
        "Measuring the base model: stopped. Nothing of it is kept: going on measures it again."]
    assert not at.error and not at.subheader and key[1:] not in at.session_state["labs"]  # nothing reads it
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("go_on_"))).click()
    at = run(at)
    assert any(h.value == "Edited model vs base" for h in at.subheader) and key[1:] in at.session_state["labs"]


def test_a_stopped_cut_of_a_channel_and_a_stopped_drop_check_show_their_notices_then_go_on():
    at, handle = _redundancy_page()
    cut = _the_one_computed(at, handle, "views/channels.py", "channels.intervention")
    at.session_state[STOPPED] = {cut}
    at = run(at)
    assert [i.value for i in at.info if "stopped" in i.value] == [
        f"Running the evaluation set with {cut[3].label}: stopped. Nothing of it is kept; going on starts it again."]
    assert not at.metric and not at.error  # its numbers read it
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("go_on_"))).click()
    at = run(at)
    assert STORE.get(cut) is not None and any(m.label == "KL to the unedited model" for m in at.metric)

    check = _the_one_computed(at, handle, "views/redundancy.py", "drop_check")
    at.session_state[STOPPED] = {check}
    at = run(at)
    assert [i.value for i in at.info if "stopped" in i.value] == [
        "Dropping them together: stopped. Nothing of it is kept: going on measures it again."]
    assert not any(m.label.startswith("measured Δ") for m in at.metric) and not at.error
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("go_on_"))).click()
    at = run(at)
    assert STORE.get(check) is not None and any(m.label.startswith("measured Δ") for m in at.metric)


def _the_one_computed(at, handle, page: str, step: str) -> tuple:
    """The key of the `step` this model's `page` computes on its first visit (other tests may
    have stored others), taken out of the store again."""
    for key in [k for k in STORE._items if k[0] == step and k[1] == handle.fingerprint]:
        STORE._items.pop(key)
    run(at, page)
    (key,) = [k for k in STORE._items if k[0] == step and k[1] == handle.fingerprint]
    STORE._items.pop(key)
    return key


def test_blocks_are_told_only_to_the_thread_that_asked_and_never_after(family_handles):
    import threading

    handle = family_handles["gpt2"]
    inputs = data.code_batch(handle.tokenizer, seq_len=12, n_windows=2).tokens
    told, L = [], handle.structure.n_layers
    with handle.told_of_blocks(lambda k, n: told.append((threading.get_ident(), k))):
        other = threading.Thread(target=handle.forward, args=(inputs,))
        other.start()  # another session's forward: it waits for the lock, and is told nothing
        copy = handle.private_copy()  # a copy made meanwhile carries the hooks, which stay silent
        handle.forward(inputs)
    other.join(timeout=60)
    copy.forward(inputs)
    assert not other.is_alive() and told == [(threading.get_ident(), k) for k in range(1, L + 1)]
