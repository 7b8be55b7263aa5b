import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lib import data
from lib.metrics import evaluate, metrics_from_outputs
from lib.scoring import kl_and_agreement, prepare_base


def test_lm_metrics_match_hand_computation(tiny_lm):
    batch = data.code_batch(tiny_lm.tokenizer, 32, 4)
    logits = tiny_lm.forward(batch.tokens)
    m = evaluate(tiny_lm, batch, base=logits)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 257), batch.tokens[:, 1:].reshape(-1)).item()
    assert math.isclose(m.nll, nll, rel_tol=1e-6)
    assert math.isclose(m.perplexity, math.exp(nll), rel_tol=1e-6)
    # byte tokenizer: one byte per token, so bits per byte = nll / ln 2
    assert math.isclose(m.bits_per_byte, nll / math.log(2) * batch.n_predicted / batch.n_bytes, rel_tol=1e-6)
    assert m.kl_to_base == 0.0 and m.agreement == 1.0
    assert m.size_bits == tiny_lm.size_bits and m.n_params == tiny_lm.n_params


def test_kl_is_positive_for_a_different_model():
    batch = data.ImageBatch(torch.zeros(4, 1, 8, 8), torch.arange(4), None, "t")
    base = torch.zeros(4, 10)
    base[:, 1] = 2.0  # every row's top class is 1 ...
    base[:, 0] = torch.tensor([0.0, -2.0, -1.5, 1.5])
    other = base.clone()
    other[:, 0] += 3.0  # ... until class 0 (now 3, 1, 1.5, 4.5) passes 2: rows 0 and 3 change their top class
    kl, agree = kl_and_agreement(other, base, batch)
    p, q = F.softmax(base, -1), F.softmax(other, -1)
    assert math.isclose(kl, (p * (p.log() - q.log())).sum(-1).mean().item(), rel_tol=1e-5)
    assert kl > 0 and agree == 0.5


def test_accuracy_on_answer_mask():
    tokens = torch.tensor([[9, 1, 2, 1, 2]])
    mask = torch.tensor([[False, False, False, True, True]])
    batch = data.TextBatch(tokens, 0, True, "t", mask)
    logits = torch.zeros(1, 5, 10)
    logits[0, 2, 1] = 5  # predicts token 3 correctly (1)
    logits[0, 3, 7] = 5  # predicts token 4 wrongly
    m = metrics_from_outputs(logits, batch, 1, 1)
    assert m.accuracy == 0.5 and m.bits_per_byte is None


def test_outputs_must_fit_the_batch():
    batch = data.ImageBatch(torch.zeros(3, 1, 8, 8), torch.tensor([0, 1, 2]), None, "t")
    logits = torch.zeros(3, 10)
    assert metrics_from_outputs(logits, batch, 1, 1, base=logits).agreement == 1.0
    with pytest.raises(data.DataError, match="do not belong together"):
        metrics_from_outputs(torch.zeros(4, 10), batch, 1, 1)
    with pytest.raises(data.DataError, match="different batch"):
        metrics_from_outputs(logits, batch, 1, 1, base=torch.zeros(4, 10))
    with pytest.raises(data.DataError, match="different batch or model"):
        metrics_from_outputs(logits, batch, 1, 1, base=torch.zeros(3, 12))
    with pytest.raises(data.DataError, match="different batch"):
        metrics_from_outputs(logits, batch, 1, 1, base=prepare_base(torch.zeros(2, 10), batch))


class FakeClock:
    """A clock that moves only when a fake forward says it took time: timing tests that
    do not depend on the machine."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def forward(self, seconds):
        def run():
            self.now += seconds() if callable(seconds) else seconds
        return run


def test_median_interval_is_the_order_statistics_interval():
    from lib.latency import median_interval

    assert median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == (1.0, 6.0)  # n = 6: 1 - 2/64 >= 95 %
    assert median_interval(list(range(20))) == (5, 14)  # P(Bin(20, 1/2) <= 5) = 0.021 <= 0.025 < P(<= 6)
    assert median_interval([7.0]) == (7.0, 7.0)


def test_timing_counts_only_warm_calls_and_fast_models_get_more_of_them(tiny_lm):
    from lib import latency

    clock = FakeClock()
    slow = latency.time_forward(clock.forward(0.5), repeats=6, clock=clock)
    assert slow.runs == 6 and slow.median_ms == 500 and slow.low_ms == slow.high_ms == 500
    fast = latency.time_forward(clock.forward(1e-4), repeats=6, clock=clock)
    assert fast.runs == latency.LATENCY_MAX_CALLS  # many calls, capped


def test_evaluate_does_not_time_the_first_forward(tiny_lm, monkeypatch):
    from lib import latency

    clock = FakeClock()
    monkeypatch.setattr(latency.time, "perf_counter", clock)
    first = []

    forward = tiny_lm.forward

    def first_forward_slow(inputs):  # a model whose first forward builds something, as a copy's fast path
        clock.now += 0.01 if first else 0.3
        first.append(1)
        return forward(inputs)

    monkeypatch.setattr(tiny_lm, "forward", first_forward_slow)  # on this instance, undone after the test
    batch = data.code_batch(tiny_lm.tokenizer, seq_len=16, n_windows=2)
    assert evaluate(tiny_lm, batch, latency_repeats=3).latency_ms == pytest.approx(10)


def test_latency_change_pairs_alternate_and_say_when_nothing_changed():
    from lib.latency import compare_latency

    clock, calls = FakeClock(), []
    noise = itertools.cycle([0.1, 0.101, 0.099, 0.1, 0.102, 0.1, 0.1, 0.098, 0.1, 0.101, 0.1, 0.099])

    def run(name, scale):
        def forward():
            calls.append(name)
            clock.now += scale * next(noise)
        return forward

    same = compare_latency(run("base", 1), run("model", 1), repeats=6, clock=clock)
    assert calls[:4] == ["base", "model", "model", "base"]  # drift hits both alike
    assert same.low <= 1 <= same.high and not same.measurable
    assert same.text().startswith("no measurable change (")
    half = compare_latency(run("base", 1), run("model", 0.5), repeats=6, clock=clock, predicted=0.5)
    assert half.measurable and half.high < 1 and half.text().startswith("-")
    assert half.model.median_ms < half.base.median_ms and half.predicted == 0.5

    wild = iter([0.1, 0.3, 0.05, 0.2] * 100)  # a busy machine: more pairs, until the budget is spent
    busy = compare_latency(lambda: setattr(clock, "now", clock.now + next(wild)), lambda: setattr(
        clock, "now", clock.now + next(wild)), repeats=6, clock=clock)
    assert busy.model.runs > 6 and busy.noisy and not busy.measurable


def test_a_change_inside_the_noise_floor_is_not_called_a_change():
    from lib.latency import LatencyChange, Timing

    base, slower = Timing(100.0, 99.0, 101.0, 6, 16), Timing(130.0, 125.0, 135.0, 6, 16)
    assert not LatencyChange(base, Timing(103.0, 102.0, 104.0, 6, 16), 1.03, 1.02, 1.04).measurable  # only 3 %
    assert LatencyChange(base, slower, 1.3, 1.27, 1.33).measurable
    wide = LatencyChange(base, slower, 1.3, 1.05, 1.6)  # excludes 1, but the pairs disagree by 55 %
    assert wide.noisy and not wide.measurable and wide.text() == "too noisy to tell (+5% … +60%)"


def test_flops_count_the_matrix_products(tiny_lm):
    from lib.latency import count_flops

    tokens = torch.zeros(1, 8, dtype=torch.long)
    full = count_flops(lambda: tiny_lm.forward(tokens))
    s = tiny_lm.structure
    assert full >= 2 * 8 * s.d_model * s.d_vocab  # at least the readout
    assert count_flops(lambda: tiny_lm.forward(torch.zeros(2, 8, dtype=torch.long))) == 2 * full


@pytest.fixture(params=["one chunk per window", "three chunks per window"])
def chunking(request, monkeypatch):
    """Scoring as it chunks a small vocabulary (a window's 70 predicted rows at once), and as
    it chunks a large one (32 rows at a time: three chunks per window)."""
    if request.param == "three chunks per window":
        monkeypatch.setattr("lib.scoring.CHUNK_ELEMENTS", 0)
    from lib.scoring import chunk_rows

    rows = chunk_rows(50)
    assert rows == 32 if request.param == "three chunks per window" else rows >= 70


def test_chunked_text_scores_equal_the_log_softmax_formulas(chunking):
    from lib.scoring import text_scores

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (3, 71), generator=g)  # 70 predicted rows per window
    batch = data.TextBatch(tokens, 100, True, "random")
    logits, base = torch.randn(3, 71, 50, generator=g) * 3, torch.randn(3, 71, 50, generator=g) * 3
    lq = F.log_softmax(logits[:, :-1], -1).reshape(-1, 50)
    lp = F.log_softmax(base[:, :-1], -1).reshape(-1, 50)
    nll = -lq.gather(1, tokens[:, 1:].reshape(-1, 1)).mean()
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    agree = (lq.argmax(-1) == lp.argmax(-1)).float().mean()
    got = text_scores(logits, batch, prepare_base(base, batch))
    assert got == pytest.approx((float(nll), float(kl), float(agree)), rel=1e-5)
    assert text_scores(logits, batch)[1:] == (None, None)


def test_logits_read_out_chunk_by_chunk_score_as_the_held_logits(chunking):
    """`ReadLogits` (logits never held whole: read out of the final residual per chunk)
    gives the NLL, KL, agreement, per-position scores and accuracy of the same logits held,
    as outputs and as the base."""
    from lib.scoring import ReadLogits, logits_of, text_scores

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (3, 71), generator=g)
    mask = torch.rand(3, 71, generator=g) > 0.5
    batch = data.TextBatch(tokens, 100, True, "random", answer_mask=mask)
    readout = torch.nn.Linear(16, 50)
    resid, base_resid = torch.randn(3, 71, 16, generator=g), torch.randn(3, 71, 16, generator=g)
    with torch.no_grad():
        held, held_base = readout(resid), readout(base_resid)
        lazy, lazy_base = ReadLogits(resid, readout, 50), ReadLogits(base_resid, readout, 50)
        want_rows, got_rows = {}, {}
        want = text_scores(held, batch, prepare_base(held_base, batch), want_rows)
        got = text_scores(lazy, batch, prepare_base(lazy_base, batch), got_rows)
        assert got == pytest.approx(want, rel=1e-6)
        for name in want_rows:
            torch.testing.assert_close(got_rows[name], want_rows[name])
        a = metrics_from_outputs(held, batch, 1, 1, held_base)
        b = metrics_from_outputs(lazy, batch, 1, 1, lazy_base)
        assert b.accuracy == a.accuracy and b.agreement == a.agreement
        assert b.kl_to_base == pytest.approx(a.kl_to_base, rel=1e-6)
        assert torch.equal(lazy.argmax(), held.argmax(-1))
        assert isinstance(logits_of(resid, readout, 50), torch.Tensor)  # small: read out now and held


def test_the_base_scored_against_its_own_prepared_pass_reads_nothing_out_again(chunking):
    """Scoring the logits a `prepare_base` pass was made of, against that pass: the NLL and
    per-position scores of a full scoring (the log-softmax formulas), KL 0 and agreement 1,
    and the readout never runs."""
    from dataclasses import replace

    from lib.scoring import ReadLogits, text_scores

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (3, 71), generator=g)
    batch = data.TextBatch(tokens, 100, True, "random")
    calls = []
    linear = torch.nn.Linear(16, 50)

    def readout(x):
        calls.append(x.shape[0])
        return linear(x)

    with torch.no_grad():
        logits = ReadLogits(torch.randn(3, 71, 16, generator=g), readout, 50)
        prepared = prepare_base(logits, batch)
        lq = F.log_softmax(linear(logits.resid[:, :-1]), -1).reshape(-1, 50)
        nll = -lq.gather(1, tokens[:, 1:].reshape(-1, 1))[:, 0]
        full_rows = {}
        full = text_scores(logits, batch, replace(prepared, nll=None), full_rows)  # no shortcut: a readout
        calls.clear()
        own_rows = {}
        own = text_scores(logits, batch, prepared, own_rows)
    assert calls == []
    assert own[0] == pytest.approx(float(nll.mean()), rel=1e-5) and own[1:] == (0.0, 1.0)
    assert own == pytest.approx(full, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(own_rows["nll"], nll)
    assert torch.equal(own_rows["top1"], full_rows["top1"]) and not own_rows["kl"].any()
