"""The early-exit rule (METHODS.md §6): every token (or image) stops at the first checked
depth where a criterion holds, and its prediction is the readout there.

Criteria at depth l, each a score the token exits on when it reaches the threshold t:
max softmax probability >= t; entropy <= t (nats); patience, the argmax unchanged for
t consecutive checked depths (PABEE); state saturation cos(h_l, h_{l-1}) >= t, which
needs no vocabulary projection. Readouts come from `analysis.lens` through the lenses of
`readouts`.

One forward records every depth's state and reads each checked depth out once into
per-token statistics (`stats.collect_exit_stats`). A threshold is then only a comparison:
the exit depth of every token at T thresholds is one `searchsorted` over the running
maximum of its scores, and a curve is a few gathers. Compute saved = 1 - (layers run +
exit checks) / (full forward), under the cost model of `cost` ("oracle" savings ignore the
keys and values a skipped layer owes later tokens).

The early-exit edit gives a private copy a forward that runs exactly this rule
(`ExitRule`), so the copy's outputs are the curve's predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from analysis.compress.edits import Edit, applies, edit_type, is_int, require
from analysis.compress.exits.readouts import ExitError, check_exits, exit_depths, exit_lens
from analysis.compress.exits.stats import (
    ExitStats,
    collect_exit_stats,
    criterion_scores,
    depth_table,
    exit_index,
    token_rows,
)
from analysis.lens import LENS_LABELS, LENSES, ExitLens, Reader
from lib.data import Batch
from lib.errors import RecipeError
from lib.handle import ModelHandle

CRITERIA = ("max_prob", "entropy", "patience", "saturation")
CRITERION_LABELS = {"max_prob": "max probability ≥ t", "entropy": "entropy ≤ t (nats)",
                    "patience": "argmax unchanged for t checks", "saturation": "cos(h_l, h_l-1) ≥ t"}
N_THRESHOLDS = 100


@dataclass(frozen=True)
class ThresholdRange:
    """The thresholds a criterion takes on a model: [low, high] in steps of `step`
    (`integer`: whole numbers), `default` a sensible start, `exits_when` ">=" or "<="."""

    low: float
    high: float
    step: float
    default: float
    integer: bool
    exits_when: str


def n_classes(handle: ModelHandle) -> int:
    """Vocabulary size of an LM, number of classes of a classifier (its last linear layer)."""
    if handle.kind == "causal-lm":
        return handle.structure.d_vocab
    return int(list(handle.linear_layers().values())[-1].shape[0])


def threshold_range(handle: ModelHandle, criterion: str) -> ThresholdRange:
    """The range of `criterion`'s threshold on this model (for a slider and for checks)."""
    _check_criterion(criterion)
    if criterion == "max_prob":
        return ThresholdRange(0.0, 1.0, 0.01, 0.9, False, ">=")
    if criterion == "entropy":
        top = math.ceil(math.log(n_classes(handle)) * 100) / 100  # the uniform distribution's entropy, rounded up
        return ThresholdRange(0.0, top, 0.01, min(0.5, top), False, "<=")
    if criterion == "patience":
        k = len(exit_depths(handle))
        return ThresholdRange(0, k, 1, min(2, k), True, ">=")
    return ThresholdRange(-1.0, 1.0, 0.001, 0.95, False, ">=")


def _check_criterion(criterion: object) -> None:
    require(criterion in CRITERIA, f"An exit criterion is one of {', '.join(CRITERIA)}, not {criterion!r}.")


def _normalised(criterion: str, threshold: object) -> float | int:
    """`threshold` checked (`_check_threshold`) and in its canonical type: a patience is an
    int (2.0 from a slider is 2), any other threshold a float (1 and 1.0 are one recipe)."""
    if criterion == "patience" and isinstance(threshold, float) and threshold.is_integer():
        threshold = int(threshold)
    _check_threshold(criterion, threshold)
    return threshold if criterion == "patience" else float(threshold)


def _check_threshold(criterion: str, threshold: object) -> None:
    """The model-free part of the range check (an entropy bound and the number of checks
    need the model: `EarlyExit.check`)."""
    if criterion == "patience":
        require(is_int(threshold) and threshold >= 0,
                f"Patience counts checked layers: a whole number >= 0, not {threshold!r}.")
        return
    require(isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold),
            f"An exit threshold is a number, not {threshold!r}.")
    if criterion == "entropy":
        require(threshold >= 0, f"The entropy threshold is >= 0 nats (and at most ln V for V classes); "
                                f"{threshold!r} is outside that.")
        return
    low, high = {"max_prob": (0.0, 1.0), "saturation": (-1.0, 1.0)}[criterion]
    require(low <= threshold <= high, f"The {criterion} threshold lies in [{low:g}, {high:g}]; "
                                      f"{threshold!r} is outside it.")


# ---------------------------------------------------------------------- thresholds -> curves


@dataclass(frozen=True)
class ExitCurve:
    """One criterion over thresholds, every array [T].

    mean_exit: mean exit depth (layers run); early: share of tokens that exit before
    the last layer; saved: compute saved, the key/value projections of skipped layers
    charged (classifiers: nothing to charge); saved_oracle: compute saved ignoring them;
    agreement: top-1 agreement of the exited predictions with the full model; nll: their
    mean negative log-likelihood of the targets (nats); accuracy: on the task's answers
    or the images' labels, None for plain text.
    """

    criterion: str
    lens: str
    thresholds: torch.Tensor
    mean_exit: torch.Tensor
    early: torch.Tensor
    saved: torch.Tensor
    saved_oracle: torch.Tensor
    agreement: torch.Tensor
    nll: torch.Tensor
    accuracy: torch.Tensor | None
    n_layers: int

    @property
    def perplexity(self) -> torch.Tensor:
        return self.nll.clamp_max(700).exp()


@dataclass(frozen=True)
class ExitPoint:
    """One criterion at one threshold: the numbers of `ExitCurve` as floats, and
    exit_depth [N] every token's (or image's) exit depth, scored or not."""

    criterion: str
    lens: str
    threshold: float
    mean_exit: float
    early: float
    saved: float
    saved_oracle: float
    agreement: float
    nll: float
    accuracy: float | None
    n_layers: int
    exit_depth: torch.Tensor

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.nll, 700.0))


def default_thresholds(stats: ExitStats, criterion: str, n: int = N_THRESHOLDS) -> torch.Tensor:
    """Thresholds [<= n] that spread the curve's points: patience every count 0..K; the
    others the ends of the criterion's range and quantiles of its scores in between."""
    _check_criterion(criterion)
    if criterion == "patience":
        return torch.arange(len(stats.depths) + 1, dtype=torch.float32)
    low, high = {"max_prob": (0.0, 1.0), "entropy": (0.0, float(stats.entropy.max())),
                 "saturation": (-1.0, 1.0)}[criterion]
    values = getattr(stats, criterion)[:, stats.scored].reshape(-1)
    values = values[torch.isfinite(values)]
    if values.numel() > 1 << 20:  # quantiles of an even sample
        values = values[:: values.numel() // (1 << 20) + 1]
    inner = torch.quantile(values.double(), torch.linspace(0, 1, n - 2, dtype=torch.float64)).float()
    return torch.cat([torch.tensor([low]), inner, torch.tensor([high])]).clamp(low, high).unique()


def _evaluate(stats: ExitStats, criterion: str, thresholds: torch.Tensor
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Exit index [T, N] of every token, and the curve's arrays [T] over scored tokens."""
    _check_criterion(criterion)
    scores, sign = criterion_scores(stats.table(), criterion)
    index = exit_index(scores, sign * thresholds.float())  # [T, N]
    cols = stats.scored.nonzero().squeeze(1)
    scored = index[:, cols]  # [T, n]
    depth = torch.tensor(stats.depths + (stats.n_layers,), dtype=torch.float64)
    chosen = stats.argmax[:, cols].gather(0, scored)  # [T, n] the exited predictions
    full = stats.cost.full
    out: dict[str, torch.Tensor | None] = {
        "mean_exit": depth[scored].mean(1),
        "early": (scored < len(stats.depths)).double().mean(1),
        "saved": 1 - stats.cost.exit_costs(stats.depths, criterion, oracle=False)[scored].mean(1) / full,
        "saved_oracle": 1 - stats.cost.exit_costs(stats.depths, criterion, oracle=True)[scored].mean(1) / full,
        "agreement": (chosen == stats.argmax[-1, cols]).double().mean(1),
        "nll": -stats.logprob[:, cols].gather(0, scored).double().mean(1),
        "accuracy": None,
    }
    if stats.answers is not None:
        answered = stats.answers[cols]
        out["accuracy"] = (chosen == stats.targets[cols])[:, answered].double().mean(1)
    return index, out


def exit_curve(stats: ExitStats, criterion: str, thresholds: torch.Tensor | None = None) -> ExitCurve:
    """Every number of one criterion at many thresholds (default `default_thresholds`),
    from the recorded statistics alone: no forward."""
    thresholds = (default_thresholds(stats, criterion) if thresholds is None
                  else _checked_thresholds(stats, criterion, thresholds))
    _, out = _evaluate(stats, criterion, thresholds)
    return ExitCurve(criterion, stats.lens, thresholds, **out, n_layers=stats.n_layers)


def _checked_thresholds(stats: ExitStats, criterion: str, thresholds: object) -> torch.Tensor:
    """`thresholds` as a tensor [T], refused (ExitError) unless every one is a finite number in
    the criterion's range: a NaN threshold would silently never (or always) exit."""
    _check_criterion(criterion)
    try:
        values = torch.as_tensor(thresholds)
    except (TypeError, ValueError, RuntimeError):
        values = None
    if values is None or values.dim() != 1 or values.numel() == 0 or values.dtype == torch.bool \
            or values.is_complex():
        raise ExitError(f"Exit thresholds are a non-empty list of numbers, not {str(thresholds)[:60]}.")
    as_float = values.double()
    finite = torch.isfinite(as_float)
    if not bool(finite.all()):
        raise ExitError(f"The {criterion} thresholds include {as_float[~finite][0].item()}; every exit threshold "
                        "must be a finite number. Remove the NaN or infinite values.")
    low, high = {"max_prob": (0.0, 1.0), "entropy": (0.0, math.inf), "saturation": (-1.0, 1.0),
                 "patience": (0.0, float(len(stats.depths)))}[criterion]
    outside = (as_float < low) | (as_float > high)
    if criterion == "patience":
        outside |= as_float != as_float.round()
    if bool(outside.any()):
        span = f"whole numbers 0..{int(high)}" if criterion == "patience" else f"in [{low:g}, {high:g}]"
        raise ExitError(f"The {criterion} thresholds are {span} on this model; {as_float[outside][0].item():g} "
                        "is outside that. Pick thresholds inside the range.")
    return values


def exit_curves(stats: ExitStats, n: int = N_THRESHOLDS) -> dict[str, ExitCurve]:
    """The curve of every criterion, `n` thresholds each (patience: one per count)."""
    return {c: exit_curve(stats, c, default_thresholds(stats, c, n)) for c in CRITERIA}


def exit_at(stats: ExitStats, criterion: str, threshold: float) -> ExitPoint:
    """One criterion at one threshold, with every token's exit depth."""
    _check_criterion(criterion)
    threshold = _normalised(criterion, threshold)
    index, out = _evaluate(stats, criterion, torch.tensor([float(threshold)]))
    depth = torch.tensor(stats.depths + (stats.n_layers,))
    numbers = {k: None if v is None else float(v[0]) for k, v in out.items()}
    return ExitPoint(criterion, stats.lens, float(threshold), **numbers, n_layers=stats.n_layers,
                     exit_depth=depth[index[0]])


MAX_AGREEMENT_LOSS = 0.01  # a default exit may change at most 1 % of the top-1 predictions


def threshold_grid(handle: ModelHandle, criterion: str) -> torch.Tensor:
    """Every threshold the lab's slider offers for `criterion` on this model, as the slider
    holds them (low + i * step, rounded to the step's decimals) [n]."""
    span = threshold_range(handle, criterion)
    n = int(round((span.high - span.low) / span.step)) + 1
    digits = max(0, -math.floor(math.log10(span.step)))
    return torch.tensor([round(span.low + i * span.step, digits) for i in range(n)], dtype=torch.float64)


def best_exit(handle: ModelHandle, stats: ExitStats, max_loss: float = MAX_AGREEMENT_LOSS) -> ExitPoint | None:
    """The criterion and threshold (from the slider's grid, `threshold_grid`) that save the
    most compute while the exited predictions agree with the full model's on at least
    1 - `max_loss` of the tokens (or images); None when no threshold of any criterion saves
    anything at that agreement through this lens."""
    best: tuple[float, str, float] | None = None
    for criterion in CRITERIA:
        grid = threshold_grid(handle, criterion)
        curve = exit_curve(stats, criterion, grid)
        saved = torch.where(curve.agreement >= 1 - max_loss, curve.saved, torch.zeros_like(curve.saved))
        i = int(saved.argmax())
        if float(saved[i]) > 0 and (best is None or float(saved[i]) > best[0]):
            best = (float(saved[i]), criterion, float(grid[i]))
    return None if best is None else exit_at(stats, best[1], best[2])


# ---------------------------------------------------------------------- the exiting forward


@dataclass(frozen=True, eq=False)
class ExitRule:
    """An early-exit output rule for `ModelHandle.set_exit_rule_`: each token's output is
    the readout at the first of `depths` where `criterion` reaches `threshold`, else the
    model's own. Holds its lens (translators, heads), so copies carry them."""

    criterion: str
    threshold: float
    lens: ExitLens
    depths: tuple[int, ...]

    def exit_index(self, handle: ModelHandle, states: list[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
        """Index into `depths` of each token's exit ([N]; len(depths): no early exit)."""
        table = depth_table(Reader(handle, self.lens), self.depths, states, output.dim() - 1, None,
                             readouts=self.criterion != "saturation")
        scores, sign = criterion_scores(table, self.criterion)
        return exit_index(scores, torch.tensor([sign * float(self.threshold)]))[0]

    def __call__(self, handle: ModelHandle, states: list[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
        """The outputs [*, classes]: each row's readout at its exit depth."""
        return self.outputs(handle, states, output, self.exit_index(handle, states, output))

    def outputs(self, handle: ModelHandle, states: list[torch.Tensor], output: torch.Tensor,
                index: torch.Tensor) -> torch.Tensor:
        """`output` [*, classes] with each row that exits (`index` [N] < len(depths)) replaced
        by its readout at that depth."""
        lead = output.dim() - 1
        result = output.reshape(index.shape[0], -1).clone()
        reader = Reader(handle, self.lens)
        for i, depth in enumerate(self.depths):
            rows = (index == i).nonzero().squeeze(1)
            if rows.numel():
                result[rows] = reader.logits(depth, token_rows(states[depth], lead)[rows]).to(result.dtype)
        return result.view(output.shape)

    def __repr__(self) -> str:
        return f"ExitRule({self.criterion!r}, {self.threshold!r}, {self.lens!r}, depths={self.depths})"


@edit_type("early_exit")
@dataclass(frozen=True)
class EarlyExit(Edit):
    """Early exits: each token (image) stops at the first checked depth where `criterion`
    reaches `threshold` and predicts through `lens` there ("logit" or "tuned" for LMs,
    "heads" for classifiers). For "patience" the threshold is the number of consecutive
    checks with an unchanged prediction. A recipe holds at most one."""

    criterion: str
    threshold: float
    lens: str = "logit"

    def __post_init__(self) -> None:
        _check_criterion(self.criterion)
        object.__setattr__(self, "threshold", _normalised(self.criterion, self.threshold))
        require(self.lens in LENSES, f"An exit lens is one of {', '.join(LENSES)}, not {self.lens!r}.")

    @property
    def label(self) -> str:
        shown = {"max_prob": f"max prob ≥ {self.threshold:g}", "entropy": f"entropy ≤ {self.threshold:g} nats",
                 "patience": f"argmax unchanged for {self.threshold} checks",
                 "saturation": f"cos(h_l, h_l-1) ≥ {self.threshold:g}"}[self.criterion]
        return f"exit when {shown} ({LENS_LABELS[self.lens]})"

    def check(self, handle: ModelHandle) -> None:
        self.check_exits(handle)
        require(handle.exit_rule is None, "This model already exits early; a recipe holds one early exit. "
                                          "Change or remove that one instead.")

    def check_exits(self, handle: ModelHandle) -> None:
        """Refuse a model that cannot exit this way, or a threshold outside its range there."""
        try:
            check_exits(handle, self.lens)
        except ExitError as e:
            raise RecipeError(str(e)) from None
        span = threshold_range(handle, self.criterion)
        require(span.low <= self.threshold <= span.high,
                f"On this model the {self.criterion} threshold lies in [{span.low:g}, {span.high:g}]; "
                f"{self.threshold!r} is outside it.")


@applies(EarlyExit)
def _exit(handle: ModelHandle, edit: EarlyExit) -> None:
    rule = ExitRule(edit.criterion, edit.threshold, exit_lens(handle, edit.lens), exit_depths(handle))
    handle.set_exit_rule_(rule)


def exits_of(handle: ModelHandle, batch: Batch) -> ExitPoint | None:
    """Where a copy with an early-exit edit exits on `batch` and what that saves, under its
    own rule (criterion, threshold, lens) from one recorded pass; None without an exit rule.
    Agreement here is with the same copy running every layer."""
    rule = handle.exit_rule
    if not isinstance(rule, ExitRule):
        return None
    return exit_at(collect_exit_stats(handle, batch, rule.lens), rule.criterion, rule.threshold)
