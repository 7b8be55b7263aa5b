"""Per-position scores and bootstrap intervals (lib.spread): the scores give back the
metrics `lib.metrics` computes, and the intervals match cases worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lib import data
from lib.metrics import metrics_from_outputs, model_inputs
from lib.scoring import prepare_base
from lib.spread import Scores, bootstrap_interval, position_scores, resample_counts, spread


def _perturbed(outputs: torch.Tensor, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return outputs + 0.5 * torch.randn(outputs.shape, generator=gen)


@pytest.mark.parametrize("fixture", ["tiny_lm", "tiny_cnn"])
def test_scores_give_the_metrics(fixture, request):
    handle = request.getfixturevalue(fixture)
    batch = data.default_batch(handle, n_windows=4, seq_len=32) if handle.kind == "causal-lm" else \
        data.digits_batch(n=64)
    base = handle.forward(model_inputs(batch))
    outputs = _perturbed(base)
    ref = prepare_base(base, batch)
    metrics = metrics_from_outputs(outputs, batch, handle.n_params, handle.size_bits, ref)
    scores = position_scores(outputs, batch, ref)
    names = [n for n in ("bits_per_byte", "perplexity", "nll", "accuracy", "kl_to_base", "agreement")
             if getattr(metrics, n) is not None]
    assert len(names) >= 3
    for name in names:
        assert scores.value(name) == pytest.approx(getattr(metrics, name), rel=1e-5, abs=1e-6), name
    assert int(scores.flipped.sum()) == round((1 - metrics.agreement) * len(scores.flipped))


def test_denoiser_scores_give_its_psnr():
    from lib.metrics import psnr_db

    batch = data.digits_batch(n=16, denoise=True)
    outputs = batch.targets + 0.1 * torch.randn(batch.targets.shape, generator=torch.Generator().manual_seed(0))
    scores = position_scores(outputs, batch)
    assert scores.value("psnr_db") == pytest.approx(psnr_db(outputs, batch.targets), rel=1e-6)
    assert spread(scores).intervals["psnr_db"][0] < psnr_db(outputs, batch.targets) < \
        spread(scores).intervals["psnr_db"][1]


def _scores(values: list[float], per_unit: int = 1) -> Scores:
    """Scores of an image batch whose units each hold `per_unit` rows of the given NLLs."""
    n = len(values)
    return Scores(unit="window", n_units=n // per_unit, unit_of=torch.arange(n) // per_unit, width=per_unit,
                  nll=torch.tensor(values, dtype=torch.float64))


def test_two_units_give_the_hand_computed_interval():
    # Units 0 and 1: the resampled mean is 0 (p = 1/4), 1/2 (p = 1/2) or 1 (p = 1/4), so the
    # 2.5 % and 97.5 % quantiles are exactly 0 and 1.
    s = spread(_scores([0.0, 1.0]))
    assert s.intervals["nll"] == (0.0, 1.0)
    assert s.intervals["perplexity"] == pytest.approx((1.0, math.e))


def test_bootstrap_spread_matches_the_standard_error_by_hand():
    # Units of means 1, 2, 3, 4: the resampled mean has sd sqrt(var_population / n) = sqrt(1.25 / 4).
    num, den = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    counts = resample_counts(4, samples=20000)
    means = (counts @ num) / (counts @ den)
    assert float(means.mean()) == pytest.approx(2.5, abs=0.02)
    assert float(means.std()) == pytest.approx(math.sqrt(1.25 / 4), rel=0.03)
    low, high = bootstrap_interval(num, den, counts)
    assert 1.4 < low < 1.75 and 3.25 < high < 3.6  # ± 1.96 sd around 2.5, on a discrete distribution


def test_units_are_resampled_whole_and_the_seed_fixes_the_interval():
    # Two windows of two positions each: resampling windows (not positions) can only give
    # the window means 0.25 and 0.75 and their average.
    s = _scores([0.0, 0.5, 0.5, 1.0], per_unit=2)
    assert spread(s).intervals["nll"] == (0.25, 0.75)
    rng = torch.Generator().manual_seed(3)
    many = _scores(torch.rand(40, generator=rng).tolist(), per_unit=4)
    assert spread(many).intervals == spread(many).intervals
    assert spread(many).intervals != spread(many, seed=1).intervals


def test_a_paired_change_is_significant_only_when_its_interval_excludes_zero():
    base = _scores([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    worse = _scores([1.5, 2.5, 3.5, 4.5, 5.5, 6.5])  # every window 0.5 worse: the paired change is exact
    s = spread(worse, base)
    assert s.deltas["nll"] == pytest.approx((0.5, 0.5))
    assert s.significant("nll")
    noisy = _scores([1.5, 1.5, 3.5, 3.5, 5.5, 5.5])  # as often better as worse
    assert not spread(noisy, base).significant("nll")
    assert spread(base).deltas == {} and spread(base).significant("nll") is None


def test_kl_distribution_names_where_the_damage_hides(tiny_lm):
    batch = data.default_batch(tiny_lm, n_windows=4, seq_len=32)
    base = tiny_lm.forward(batch.tokens)
    ref = prepare_base(base, batch)
    outputs = base.clone()
    outputs[1, 5] += 10 * torch.randn(outputs.shape[-1], generator=torch.Generator().manual_seed(0))
    s = spread(position_scores(outputs, batch, ref), position_scores(base, batch, ref))
    q = s.kl_quantiles
    assert q["median"] == pytest.approx(0.0, abs=1e-5) and q["max"] > 1.0
    assert s.significant("kl_to_base") is None  # already a comparison with the base: no test against zero
    assert s.significant("nll") is not None
    assert "bootstrap over the 4 evaluation windows" in s.method
