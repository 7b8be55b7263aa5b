"""Bars over the work the block counts missed (issue 25, pages that stay usable): a language
model's readout and scoring, told window by window and weighed in blocks' work; the timed
forwards and pairs; a lab change's stages in order; a channel cut that counts its batch's
forward alone; the Model page's scoring and timing, each under a bar with a Stop."""

import itertools

import pytest
import torch
from test_metrics import FakeClock
from test_stopping import _redundancy_page

from lib import data
from lib.hooks import count_hooks
from ui.progress import STOPPED
from ui.store import STORE

from apptest_helpers import run


def _sorted(told):
    return [f for f, _ in told] == sorted(f for f, _ in told)


def test_a_scoring_tells_every_window_and_a_step_moves_over_its_forward_then_its_scoring(family_handles):
    from lib.metrics import metrics_from_outputs
    from lib.scoring import readout_blocks, text_scores, told_of_windows
    from ui.progress import counting_blocks

    handle = family_handles["gpt2"]
    batch = data.code_batch(handle.tokenizer, seq_len=12, n_windows=3)
    told = []
    with told_of_windows(lambda k, n: told.append((k, n))):
        text_scores(handle.outputs(batch.tokens), batch)
    assert told == [(1, 3), (2, 3), (3, 3)]
    text_scores(handle.outputs(batch.tokens), batch)  # outside, nothing is told
    assert len(told) == 3

    cfg = handle.hf_model.config  # GPT-2's block: c_attn 3 d², c_proj d², and the MLP's two d x d_mlp
    d, d_mlp = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
    assert readout_blocks(handle) == pytest.approx(d * cfg.vocab_size / (4 * d * d + 2 * d * d_mlp))

    L, told = handle.structure.n_layers, []
    with counting_blocks(handle, lambda f, m: told.append((f, m)), scorings=1):
        metrics_from_outputs(handle.outputs(batch.tokens), batch, handle.n_params, handle.size_bits)
    assert [m for _, m in told] == [f"{k} of {L} blocks" for k in range(1, L + 1)] + [
        f"scoring: window {k} of 3" for k in (1, 2, 3)]
    assert _sorted(told) and told[L - 1][0] < 1 and told[-1][0] == pytest.approx(1.0)
    assert count_hooks(handle.model) == 0


def test_timed_forwards_and_timed_pairs_tell_each_one():
    from lib import latency

    clock, told = FakeClock(), []
    latency.time_forward(clock.forward(0.5), repeats=6, clock=clock, progress=lambda f, m: told.append((f, m)))
    assert [m for _, m in told] == [f"timed forward {k} of 6" for k in range(1, 7)] and told[-1][0] == 1.0
    told = []
    change = latency.compare_latency(clock.forward(0.5), clock.forward(0.25), repeats=6, clock=clock,
                                     progress=lambda f, m: told.append((f, m)))
    assert [m for _, m in told][:6] == [f"timed pair {k} of 6" for k in range(1, 7)]
    assert len(told) == change.base.runs and _sorted(told) and all(0 < f <= 1 for f, _ in told)
    # a noisy machine: pairs go on past the six asked for, into the bar's last fifth
    base, model, told = itertools.cycle([0.1, 0.5, 0.2, 0.9]), itertools.cycle([0.3, 0.1, 0.8, 0.2]), []
    change = latency.compare_latency(clock.forward(lambda: next(base)), clock.forward(lambda: next(model)),
                                     repeats=6, clock=clock, progress=lambda f, m: told.append((f, m)))
    assert change.noisy and len(told) > 6 and told[5][0] == pytest.approx(0.8)
    assert _sorted(told) and all(0.8 <= f <= 1 for f, _ in told[6:]) and told[6][0] < 1  # not full at once


def test_a_change_in_the_lab_tells_its_stages_in_order(family_handles):
    from analysis.compress.exits import EarlyExit
    from analysis.compress.lab import Lab
    from analysis.compress.prune.pruning import Drop

    handle = family_handles["gpt2"]
    lab = Lab(handle, data.code_batch(handle.tokenizer, seq_len=12, n_windows=3), latency_repeats=2)
    told = []
    lab.add(Drop("block", 1), progress=lambda f, m: told.append((f, m)))
    stages = list(dict.fromkeys(m.partition(" ")[0].rstrip(":") for _, m in told))
    assert stages == ["copying", "applying", "measuring", "timing", "scoring"]
    L = handle.structure.n_layers
    measuring = [m for _, m in told if m.startswith("measuring")]
    assert measuring == [f"measuring: {k} of {L} blocks" for k in range(1, L + 1)]
    assert _sorted(told) and told[-1] == (pytest.approx(1.0), "scoring: window 3 of 3")
    told = []  # an early exit records where the predictions exit after the scoring: the bar's last tenth
    lab.add(EarlyExit("max_prob", 0.5), progress=lambda f, m: told.append((f, m)))
    assert _sorted(told) and told[-1] == (0.9, "recording where the predictions exit")


def test_a_channel_cut_counts_the_batchs_forward_alone(family_handles):
    """The reader's patterns on the prompt are two more forwards: they once restarted the bar."""
    from analysis.channels import circuits as ch
    from analysis.channels import heads
    from lib.metrics import metrics_from_outputs
    from lib.scoring import prepare_base
    from ui.progress import counting_blocks

    handle = family_handles["gpt2"]
    batch = data.code_batch(handle.tokenizer, seq_len=12, n_windows=3)
    c, L, told = ch.circuits(handle), handle.structure.n_layers, []
    prompt = heads.prompt_tokens(handle, "def f(x):\n    return x").ids
    base = prepare_base(handle.outputs(batch.tokens), batch)  # as the page passes it: scored once per model
    before = metrics_from_outputs(base.logits, batch, handle.n_params, handle.size_bits)
    with counting_blocks(handle, lambda f, m: told.append((f, m)), scorings=1):
        heads.intervene(handle, batch, c, heads.HeadEdit(0, 0, (), 0.0), (1, 0), prompt, base=base, before=before)
    blocks = [m for _, m in told if m.endswith("blocks")]
    assert blocks == [f"{k} of {L} blocks" for k in range(1, L + 1)]  # the edited forward's, counted once
    assert _sorted(told) and told[-1] == (pytest.approx(1.0), "scoring: window 3 of 3")


def test_the_model_pages_scoring_and_timing_are_stoppable_and_the_rest_is_shown():
    from lib.metrics import metrics_from_outputs
    from lib.spread import position_scores, spread
    from ui.cache import base_outputs, batch_key, eval_batch, scored_baseline

    at, handle = _redundancy_page()
    at = run(at, "views/model.py")
    metrics, intervals = scored_baseline(handle)  # one scoring: the same numbers as scoring twice
    outputs, batch = base_outputs(handle), eval_batch(handle)
    assert metrics == metrics_from_outputs(outputs, batch, handle.n_params, handle.size_bits)
    assert intervals == spread(position_scores(outputs, batch))

    timing = ("base_latency", *batch_key(handle), 0)
    STORE._items.pop(timing, None)
    at.session_state[STOPPED] = {timing}
    at = run(at, "views/model.py")
    assert [i.value for i in at.info if "stopped" in i.value] == [
        "Timing the model: stopped. Nothing of the timing is kept: going on times it again."]
    assert not at.error and "latency" not in {m.label for m in at.metric}
    assert {"bits per byte", "perplexity", "size"} <= {m.label for m in at.metric}  # every other number
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("go_on_"))).click()
    at = run(at)
    assert "latency" in {m.label for m in at.metric} and STORE.get(timing) is not None

    scoring = ("base_scored", *batch_key(handle))
    STORE._items.pop(scoring, None)
    at.session_state[STOPPED] = {scoring}
    at = run(at, "views/model.py")
    assert [i.value for i in at.info if "stopped" in i.value] == [
        "Scoring the model on its evaluation set: stopped. Nothing of the scoring is kept: going on scores it again."]
    assert not at.error and not at.metric and STORE.get(scoring) is None
    assert any(h.value == "Next-token prediction" for h in at.subheader)


def test_a_stopped_linearisation_shows_its_notice_and_the_prompt_then_goes_on():
    from test_stopping import _the_one_computed

    at, handle = _redundancy_page()
    key = _the_one_computed(at, handle, "views/interpreter.py", "interpreter_tokens")
    at.session_state[STOPPED] = {key}
    at = run(at)
    assert [i.value for i in at.info if "stopped" in i.value] == [
        "Linearising the model: stopped. Nothing of it is kept: going on runs it again."]
    assert not at.error and not at.metric and at.text_area  # the prompt can still be changed
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("go_on_"))).click()
    at = run(at)
    assert STORE.get(key) is not None and "reconstruction error" in {m.label for m in at.metric}


def test_the_linearisations_bar_moves_block_by_block(tiny_lm, monkeypatch):
    """Linearising runs the float64 copy's blocks twice (at the prompt, then at zero inputs):
    each block moves the bar, which is where a Stop ends it; the hooks go with it."""
    import ui.interpreter as ui_it
    from analysis.interpreter import transformer as it

    computed = {}
    monkeypatch.setattr(ui_it, "stored", lambda key, compute, *a, **k: computed.setdefault(key[0], compute))
    monkeypatch.setattr(ui_it, "COPIES", ui_it.TensorStore(max_entries=1))
    ui_it.token_contributions(tiny_lm, "def f(x):", 1, None)
    told, L = [], tiny_lm.structure.n_layers
    result = computed["interpreter_tokens"](lambda f, m: told.append((f, m)))
    assert [m for _, m in told] == [f"forward {k} of 2" for k in (1, 2) for _ in range(L)]
    assert [f for f, _ in told] == pytest.approx([b / (2 * L) for b in range(1, 2 * L + 1)])
    assert result.error < 1e-9  # the same exact decomposition as without a bar
    assert count_hooks(ui_it.working_copy(tiny_lm).model) == 0
    assert it.token_contributions(tiny_lm, result.tokens, result.target).value == pytest.approx(result.value)


def test_the_drop_sweeps_bar_moves_by_the_work_of_each_drop(tiny_lm):
    """Dropping block 0 reruns every block after it, dropping the last MLP none: the bar once
    moved by one drop's share for either, and sat still while the base was scored."""
    from analysis.redundancy import report as rr
    from analysis.redundancy.drops import lm_drop_sweep

    batch = data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=3)
    told, L = [], tiny_lm.structure.n_layers
    lm_drop_sweep(tiny_lm, batch, rr.residual_pass(tiny_lm, batch), progress=lambda f, m: told.append((f, m)))
    at = {m: f for f, m in told}
    assert told[0][1] == "the model as it is: scoring window 1 of 3"  # the base's scoring moves the bar too
    first = at["dropping block 1"] - at["dropping block 0"]
    last = at[f"dropping mlp {L - 1}: scoring window 3 of 3"] - at[f"dropping mlp {L - 1}"]
    assert first > last > 0 and _sorted(told) and told[-1][0] == pytest.approx(1.0)


def test_the_labs_depth_profile_moves_over_its_forward_then_its_lens(family_handles):
    """The lens reads out every depth: it was ten silent seconds after the blocks' bar on GPT-2 small."""
    from analysis.compress.compare import depth_profile

    handle, told = family_handles["gpt2"], []
    depth_profile(handle, data.code_batch(handle.tokenizer, seq_len=12, n_windows=2), progress=lambda f, m:
                  told.append((f, m)))
    stages = list(dict.fromkeys(m.split(":")[0] if m.startswith("logit") else "blocks" for _, m in told))
    assert stages == ["blocks", "logit lens"] and _sorted(told) and told[-1][0] == pytest.approx(1.0)
    assert count_hooks(handle.model) == 0


def test_a_model_too_slow_to_time_one_row_is_timed_on_its_first_tokens(tiny_lm, monkeypatch):
    """Llama-3.2-1B in bfloat16 took 30 s for one row of 128 tokens here: six timed forwards
    and an untimed one made the Model page's timing take 4 minutes."""
    from analysis.compress.lab import Lab
    from analysis.compress.prune.pruning import Magnitude
    from lib import latency

    ids, images = torch.zeros(4, 128, dtype=torch.long), torch.zeros(4, 1, 8, 8)
    assert latency.timed_part(ids, 4 * 30.0, 6).shape == (1, latency.MIN_TIMED_POSITIONS)
    assert latency.timed_part(ids, 4 * 1.0, 6).shape == (1, 64)  # 3 s for six: 0.5 s a forward, half a row
    assert latency.timed_part(ids, 4 * 0.4, 6).shape == (1, 128)  # one whole row fits
    assert latency.timed_part(ids, 4 * 0.05, 6).shape == (4, 128)  # all of it fits
    assert latency.timed_part(images, 4 * 30.0, 6).shape == (1, 1, 8, 8)  # an image is not cut
    monkeypatch.setattr(latency, "LATENCY_BUDGET_SECONDS", 0.0)  # nothing fits: the fewest tokens
    batch = data.code_batch(tiny_lm.tokenizer, seq_len=32, n_windows=4)
    lab = Lab(tiny_lm, batch, latency_repeats=6)
    timed = lab.base_point.latency.base
    assert (timed.rows, timed.positions) == (1, latency.MIN_TIMED_POSITIONS)
    assert timed.over(4) == f"the first {latency.MIN_TIMED_POSITIONS} tokens of one of its rows"
    change = lab.add(Magnitude(0.5)).latency
    assert (change.model.rows, change.model.positions) == (1, latency.MIN_TIMED_POSITIONS)


def test_a_lab_told_how_long_the_base_forward_took_runs_no_forward_to_pace_its_timing(tiny_lm, monkeypatch):
    from analysis.compress.lab import Lab
    from lib.scoring import prepare_base

    batch = data.code_batch(tiny_lm.tokenizer, seq_len=32, n_windows=4)
    base = prepare_base(tiny_lm.outputs(batch.tokens), batch)
    shapes, forward = [], type(tiny_lm).forward
    monkeypatch.setattr(type(tiny_lm), "forward", lambda self, x: (shapes.append(tuple(x.shape)), forward(self, x))[1])
    lab = Lab(tiny_lm, batch, base, latency_repeats=6, forward_seconds=1e9)  # as if it had taken forever
    assert shapes[:7] == [(1, 16)] * 7 and (1, 32) not in shapes, shapes  # no row paces it: the fewest tokens, timed
    assert lab.base_point.latency.base.positions == 16


def test_a_bar_over_scoring_alone_does_not_hold_the_models_lock(family_handles):
    """Block hooks hold the shared model's lock; a step that only scores (the baseline, the
    prepared base) once kept every other session's forward waiting behind it."""
    import threading

    from ui.progress import counting_blocks

    handle, taken = family_handles["gpt2"], []
    with counting_blocks(handle, lambda f, m: None, forwards=0, scorings=1):
        other = threading.Thread(target=lambda: taken.append(handle.lock.acquire(timeout=5) and handle.lock.release()
                                                             is None))
        other.start()
        other.join()
    assert taken == [True]


def test_a_size_of_a_gigabyte_or_more_is_shown_in_gib():
    """Llama-3.2-1B's "2357.13 MiB" was cut off in the Model page's tile."""
    from analysis.metric_text import size_text

    assert size_text(2357.13 * 8 * 2**20) == "2.30 GiB" and size_text(6.21 * 8 * 2**20) == "6.21 MiB"
    assert size_text(-1.18 * 8 * 2**20, signed=True) == "-1.18 MiB" and size_text(8 * 2**30, signed=True) == "+1.00 GiB"


def test_a_calibrating_edit_moves_the_bar_over_its_forwards_and_solves(tiny_lm):
    """QuantEase's calibration forwards tell their blocks, then each layer's solve; Wanda's one
    forward tells its blocks; applying them gets the part of the bar their work takes (not the
    5 % of an edit that only rewrites weights), and the bar never goes back."""
    from analysis.compress.lab import Lab
    from analysis.compress.prune.pruning import Magnitude, Wanda
    from analysis.compress.quant.quantize import Quantize

    lab = Lab(tiny_lm, data.default_batch(tiny_lm, n_windows=2, seq_len=32), latency_repeats=0)
    told = []
    lab.add(Quantize("int4", method="quantease"), progress=lambda f, m: told.append((f, m)))
    assert _sorted(told)
    applying = [(f, m) for f, m in told if m.startswith("applying quantize int4")]
    L, layers = tiny_lm.structure.n_layers, len(tiny_lm.linear_layers())  # the unembedding is not in 'all'
    assert any("calibration forward" in m and m.endswith(f"{L} of {L} blocks") for _, m in applying)
    last = applying[-1][1].rpartition("QuantEase: layer ")[2].split(" of ")
    assert len(last) == 2 and last[0] == last[1] and int(last[0]) >= layers - 1  # every quantized layer solved
    assert applying[-1][0] > 0.05  # its forwards and solves outweigh a weight rewrite's share
    told = []
    lab.add(Wanda(0.5), progress=lambda f, m: told.append((f, m)))
    assert _sorted(told)
    assert [m for _, m in told if "calibration" in m] == [
        f"applying Wanda 50% (all): calibration forward: {k} of {L} blocks" for k in range(1, L + 1)]
    told = []
    lab.add(Magnitude(0.1), progress=lambda f, m: told.append((f, m)))
    applying = [f for f, m in told if m.startswith("applying")]
    assert len(applying) == 1 and applying[0] < 0.05  # a rewrite: one message, inside its 5 %
