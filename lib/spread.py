"""What one evaluation is made of, and how sure its numbers are.

`position_scores` keeps, for every scored row (a predicted position of a text window, or
an image), the numbers behind `lib.metrics.Metrics`: the NLL, KL(base || model), the
model's and the base's top-1, whether the answer was right, an image's squared error.
`spread` turns them into percentile-bootstrap intervals over the evaluation *units* (the
batch's windows or images, resampled with replacement: positions within one window are
not independent), into the interval of each metric's change against the base (paired:
both resampled with the same units), and into the distribution of the per-position KL
(median, p90, p99, max: where the damage hides behind a small mean).

    scores = position_scores(outputs, batch, reference)
    s = spread(scores, base_scores)
    s.intervals["bits_per_byte"], s.deltas["bits_per_byte"], s.significant("bits_per_byte")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lib.data import Batch, ImageBatch, TextBatch
from lib.scoring import BaseOutputs, check_finite, text_scores

BOOTSTRAP_SAMPLES = 2000  # resamples of the units: the 2.5 % and 97.5 % quantiles move by < 1 % of the width
CONFIDENCE = 0.95
SEED = 0  # one fixed stream of resamples: the same scores always give the same interval
KL_QUANTILES = (("median", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))


@dataclass(frozen=True)
class Scores:
    """Per-row scores of one model on one batch. Rows are predicted positions (window-major)
    of a text batch, or images; all tensors are [n] on the CPU, None where they do not apply.

    unit: "window" | "image"; n_units: how many; unit_of: [n] the unit of each row;
    width: predicted positions per window (1 for images);
    nll: NLL of the target token (nats); kl: KL(base || model) (with a base);
    top1, base_top1: top-1 class of the model and of the base; hit: the top-1 was right,
    counted where `scored` (a task's answer positions, or every image of a classifier);
    sq_err: an image-to-image model's mean squared error per image (outputs clamped to [0, 1]);
    bits_per_nat: bits per byte of a mean NLL of one nat (the batch's predicted positions /
    (ln 2 x its bytes)), None for a batch without bytes.
    """

    unit: str
    n_units: int
    unit_of: torch.Tensor
    width: int
    nll: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    top1: torch.Tensor | None = None
    base_top1: torch.Tensor | None = None
    hit: torch.Tensor | None = None
    scored: torch.Tensor | None = None
    sq_err: torch.Tensor | None = None
    bits_per_nat: float | None = None

    @property
    def flipped(self) -> torch.Tensor | None:
        """[n] rows whose top-1 differs from the base's (None without a base)."""
        if self.top1 is None or self.base_top1 is None:
            return None
        return self.top1 != self.base_top1

    def unit_values(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-unit numerator and denominator [n_units] (float64) of metric `name`, whose
        value on the whole batch is transform(sum(numerator) / sum(denominator)); None when
        these scores do not give it."""
        value, weight = _row_values(self, name)
        if value is None:
            return None
        w = torch.ones_like(value, dtype=torch.float64) if weight is None else weight.double()
        num = torch.zeros(self.n_units, dtype=torch.float64).index_add_(0, self.unit_of, value.double() * w)
        den = torch.zeros(self.n_units, dtype=torch.float64).index_add_(0, self.unit_of, w)
        return num, den

    def value(self, name: str) -> float | None:
        """Metric `name` on the whole batch, as `lib.metrics` computes it."""
        parts = self.unit_values(name)
        if parts is None or float(parts[1].sum()) == 0:
            return None
        return _transform(self, name)(parts[0].sum() / parts[1].sum()).item()


def _row_values(s: Scores, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if name in ("nll", "perplexity") or (name == "bits_per_byte" and s.bits_per_nat):
        return s.nll, None
    if name == "accuracy":
        return (None, None) if s.hit is None else (s.hit, s.scored)
    if name == "kl_to_base":
        return s.kl, None
    if name == "agreement":
        return (None, None) if s.flipped is None else (~s.flipped, None)
    if name == "psnr_db":
        return s.sq_err, None
    return None, None


def _transform(s: Scores, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "perplexity":
        return lambda x: torch.exp(x.clamp_max(700.0))
    if name == "bits_per_byte":
        return lambda x: x * s.bits_per_nat
    if name == "psnr_db":
        return lambda x: 10 * torch.log10(1.0 / x.clamp_min(1e-12))
    return lambda x: x


@torch.no_grad()
def position_scores(outputs: torch.Tensor, batch: Batch, ref: BaseOutputs | torch.Tensor | None = None,
                    per_row: dict[str, torch.Tensor] | None = None) -> Scores:
    """Per-row scores of `outputs` on `batch` (already checked by `lib.metrics.check_outputs`)
    against the prepared base `ref` (`lib.scoring.prepare_base`; a denoiser's base images
    as they are), by `lib.scoring.text_scores` itself for text; `per_row`: what the pass
    that gave the metrics kept (`metrics_from_outputs(per_row=...)`), so text is scored once."""
    if isinstance(batch, TextBatch):
        return _text_scores(outputs, batch, ref, per_row)
    b = outputs.shape[0]
    common = dict(unit="image", n_units=b, unit_of=torch.arange(b), width=1)
    if isinstance(batch, ImageBatch) and batch.targets is not None:
        err = F.mse_loss(outputs.clamp(0, 1).float(), batch.targets.to(outputs.device).float(),
                         reduction="none").flatten(1).mean(1)
        return Scores(**common, sq_err=err.cpu())
    check_finite(outputs)
    z = outputs.float()
    top1 = z.argmax(-1)
    hit = (top1 == batch.labels.to(z.device)).cpu()
    if ref is None:
        return Scores(**common, top1=top1.cpu(), hit=hit)
    kl = (ref.dot - torch.linalg.vecdot(ref.probs(slice(0, ref.n_rows)), z)) + (torch.logsumexp(z, -1) - ref.lse)
    return Scores(**common, kl=kl.clamp_min(0).cpu(), top1=top1.cpu(), base_top1=ref.top1.cpu(), hit=hit)


def _text_scores(outputs: torch.Tensor, batch: TextBatch, ref: BaseOutputs | None,
                 per_row: dict[str, torch.Tensor] | None) -> Scores:
    b, T = batch.tokens.shape
    if per_row is None:  # not kept by the pass that gave the metrics: one pass of the same formulas
        per_row = {}
        text_scores(outputs, batch, ref, per_row)
    scored = hit = None
    top1 = per_row["top1"]
    if batch.answer_mask is not None:
        scored = batch.answer_mask[:, 1:].reshape(-1).cpu()
        hit = top1 == batch.tokens[:, 1:].reshape(-1).cpu()
    return Scores(
        unit="window", n_units=b, unit_of=torch.arange(b).repeat_interleave(T - 1), width=T - 1,
        nll=per_row["nll"], kl=per_row["kl"].clamp_min(0) if ref is not None else None, top1=top1,
        base_top1=ref.top1.cpu() if ref is not None else None, hit=hit, scored=scored,
        bits_per_nat=b * (T - 1) / math.log(2) / batch.n_bytes if batch.n_bytes else None)


# ---------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class Spread:
    """Uncertainty of one evaluation (`spread`).

    intervals: metric -> (low, high), the 95 % percentile-bootstrap interval; deltas:
    metric -> (low, high) of (this model's metric - the base's), paired (empty for the
    base itself); kl_quantiles: name -> per-position KL(base || model) at that quantile
    (None without a base); n_units, unit: what was resampled; method: the sentence that
    says how the intervals were made.
    """

    intervals: dict[str, tuple[float, float]]
    deltas: dict[str, tuple[float, float]]
    kl_quantiles: dict[str, float] | None
    n_units: int
    unit: str
    method: str

    def significant(self, name: str) -> bool | None:
        """Whether the change of `name` against the base is significant: its paired
        interval excludes zero (None when there is no such interval)."""
        if name not in self.deltas:
            return None
        low, high = self.deltas[name]
        return low > 0 or high < 0


SPREAD_FIELDS = ("bits_per_byte", "perplexity", "nll", "accuracy", "psnr_db", "kl_to_base", "agreement")


def resample_counts(n_units: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = SEED) -> torch.Tensor:
    """[samples, n_units] how often each unit is drawn in each bootstrap resample (n_units
    draws with replacement each), from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_units, (samples, n_units), generator=gen)
    return torch.zeros(samples, n_units, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(samples, n_units, dtype=torch.float64))


def bootstrap_interval(num: torch.Tensor, den: torch.Tensor, counts: torch.Tensor,
                       transform: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of transform(sum(num) / sum(den)) over resamples of the units
    (`counts` from `resample_counts`); resamples whose denominator is 0 are left out."""
    return _quantiles(_replicates(num, den, counts, transform), confidence)


def _replicates(num: torch.Tensor, den: torch.Tensor, counts: torch.Tensor,
                transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    n, d = counts @ num, counts @ den
    values = transform(n / d.clamp_min(1e-300))
    return torch.where(d > 0, values, torch.full_like(values, float("nan")))


def _quantiles(values: torch.Tensor, confidence: float) -> tuple[float, float]:
    values = values[~torch.isnan(values)]
    tail = (1 - confidence) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=values.dtype)).tolist()
    return low, high


def spread(scores: Scores, base: Scores | None = None, samples: int = BOOTSTRAP_SAMPLES,
           seed: int = SEED, confidence: float = CONFIDENCE) -> Spread:
    """Bootstrap intervals of every metric `scores` give, and of their change against
    `base` (the base model's scores on the same batch: paired, the same resampled units)."""
    counts = resample_counts(scores.n_units, samples, seed)
    intervals, deltas = {}, {}
    for name in SPREAD_FIELDS:
        parts = scores.unit_values(name)
        if parts is None or float(parts[1].sum()) == 0:
            continue
        transform = _transform(scores, name)
        mine = _replicates(*parts, counts, transform)
        intervals[name] = _quantiles(mine, confidence)
        theirs = None if base is None or base is scores else base.unit_values(name)
        # KL and agreement are already against the base (0 and 1 for the base itself): any edit that changes
        # one answer moves them off, so a test of their change against zero would always pass; none is made
        if theirs is not None and base.n_units == scores.n_units and name not in ("kl_to_base", "agreement"):
            deltas[name] = _quantiles(mine - _replicates(*theirs, counts, _transform(base, name)), confidence)
    quantiles = None
    if scores.kl is not None and base is not scores:
        q = torch.quantile(scores.kl.double(), torch.tensor([p for _, p in KL_QUANTILES], dtype=torch.float64))
        quantiles = {label: float(v) for (label, _), v in zip(KL_QUANTILES, q)}
    units = f"{scores.n_units} evaluation {scores.unit}s"
    method = (f"{confidence:.0%} percentile bootstrap over the {units} ({samples:,} resamples with replacement, "
              f"seed {seed}); a change is paired: base and edited model resampled with the same {scores.unit}s"
              + ("; bits per byte takes the batch's bytes per token as fixed" if scores.bits_per_nat else ""))
    return Spread(intervals, deltas, quantiles, scores.n_units, scores.unit, method)
