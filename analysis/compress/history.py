"""What the compression lab records and how it compares recipes: one `LabPoint` per recipe
tried, the quality number a model of each kind is judged by, the Pareto frontier of cost
against quality, and what the edits did to each linear layer (`LayerSummary`).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Sequence

from analysis.compress.edits import Edit
from analysis.compress.exits import ExitPoint
from analysis.compress.recipe import Recipe
from lib.errors import RecipeError
from lib.handle import ModelHandle
from lib.latency import LatencyChange
from lib.metrics import LABELS, METRIC_FIELDS, Metrics
from lib.spread import Scores, Spread

QUALITY_ORDER = ("bits_per_byte", "accuracy", "psnr_db", "perplexity")  # which quality number judges a model
HIGHER_IS_BETTER = frozenset({"accuracy", "psnr_db", "agreement"})
COSTS = ("size_bits", "latency_ms")


def quality_metric(metrics: Metrics) -> str:
    """The quality number a model of this kind is judged by: bits per byte for text with
    byte counts, else accuracy (classifiers, the induction task), PSNR (denoisers),
    perplexity."""
    for name in QUALITY_ORDER:
        if getattr(metrics, name) is not None:
            return name
    raise RecipeError("These metrics hold no quality number (bits per byte, accuracy, PSNR or perplexity).")


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER


def pareto_front(costs: Sequence[float], qualities: Sequence[float], higher_better: bool) -> list[int]:
    """Indices of the points no other point dominates (cost <= and quality at least as
    good, one of them strictly), in order of increasing cost. Lower cost is better;
    quality is better higher or lower as `higher_better` says."""
    sign = -1.0 if higher_better else 1.0  # compare "badness": lower is better on both axes
    points = [(float(c), sign * float(q)) for c, q in zip(costs, qualities)]
    front = []
    for i, (c, b) in enumerate(points):
        dominated = any(c2 <= c and b2 <= b and (c2 < c or b2 < b) for j, (c2, b2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def frontier(points: Sequence["LabPoint"], cost: str, quality: str) -> list[int]:
    """Steps of `points` on the Pareto frontier of `cost` ("size_bits" or "latency_ms", lower is
    better; latency relative to the base) against `quality`."""
    if cost not in COSTS:
        raise RecipeError(f"The frontier is drawn against {' or '.join(COSTS)}, not {cost!r}.")
    if quality not in LABELS:
        raise RecipeError(f"There is no metric {quality!r}.")
    points = [p for p in points if p.cost(cost) is not None and getattr(p.metrics, quality) is not None]
    front = pareto_front([p.cost(cost) for p in points],
                         [getattr(p.metrics, quality) for p in points], higher_is_better(quality))
    return [points[i].step for i in front]


def metric_deltas(metrics: Metrics, base: Metrics) -> dict[str, float]:
    """Each metric of `metrics` minus the base's, where both have it."""
    return {name: getattr(metrics, name) - getattr(base, name) for name in METRIC_FIELDS
            if getattr(metrics, name) is not None and getattr(base, name) is not None}


def recipe_digest(edits: Sequence[Edit]) -> str:
    """The digest `Recipe.digest` gives these edits in this order ('' for none)."""
    return Recipe("", list(edits)).digest


def recipe_label(edits: Sequence[Edit]) -> str:
    return " + ".join(e.label for e in edits) if edits else "base (no edits)"


@dataclass(frozen=True)
class LabPoint:
    """One recipe tried in the lab.

    step: position in the history (0 is the base); edits: the recipe's edits in order;
    digest: `Recipe.digest` of them; recipe_json: the recipe as `Recipe.to_json()` writes
    it; metrics: measured on the evaluation batch against the base outputs (latency_ms:
    the median of the model's timed forwards); exits: for a recipe with an early exit,
    where its predictions exit and the compute that saves (None without one); latency:
    the model timed against the base in the same moment, with the FLOP prediction (None
    when the lab does not time: `Lab(latency_repeats=0)`).
    scores: per-position scores on the batch (`lib.spread.Scores`: flipped answers, KL per
    token); spread: the metrics' bootstrap intervals, and their changes' against the base.
    """

    step: int
    edits: tuple[Edit, ...]
    digest: str
    label: str
    recipe_json: str
    metrics: Metrics
    exits: ExitPoint | None = None
    latency: LatencyChange | None = None
    scores: Scores | None = field(default=None, repr=False, compare=False)
    spread: Spread | None = None

    def cost(self, name: str) -> float:
        """The cost `name` of this point: size in bits, or latency relative to the base
        (measured against it in the same moment; 1.0 for the base), falling back to the
        milliseconds when the lab does not time."""
        if name == "latency_ms" and self.latency is not None:
            return self.latency.ratio
        return getattr(self.metrics, name)


@dataclass(frozen=True)
class LayerSummary:
    """What the edits did to each linear layer of the base, in the base's order.

    names: readable layer names (`blocks.3.mlp.in`, `conv2`) [n]; sparsity: share of
    exact zeros in the edited layer's weight [n] (1.0 for a removed layer); kept: nonzero
    weights of the edited layer over the base layer's weight count [n] (smaller after
    head removal, 0 when removed); removed: whether the layer is gone [n];
    heads_kept: heads each block still computes (LMs; None for image models), with
    n_heads the base's count; removed_parts: the structure's removed parts.
    """

    names: tuple[str, ...]
    sparsity: tuple[float, ...]
    kept: tuple[float, ...]
    removed: tuple[bool, ...]
    heads_kept: tuple[int, ...] | None
    n_heads: int
    removed_parts: tuple[str, ...]


def layer_summary(base: ModelHandle, edited: ModelHandle) -> LayerSummary:
    """Per linear layer of `base`: the share of exact zeros in `edited`'s weight, the
    nonzero weights kept, whether it is gone; heads kept per block for LMs."""
    before, after = base.linear_layers(), edited.linear_layers()
    sparsity, kept, removed = [], [], []
    for name, weight in before.items():
        w = after.get(name)
        removed.append(w is None)
        zeros = 0 if w is None else w.numel() - int(w.count_nonzero())  # 15x (w == 0).sum() in bf16
        sparsity.append(1.0 if w is None else zeros / w.numel())
        kept.append(0.0 if w is None else (w.numel() - zeros) / weight.numel())
    heads = None
    if edited.kind == "causal-lm":
        gone = set(edited.structure.removed)
        heads = tuple(0 if {f"block {layer}", f"attention {layer}"} & gone else len(edited.heads.left(layer))
                      for layer in range(edited.structure.n_layers))
    return LayerSummary(tuple(before), tuple(sparsity), tuple(kept), tuple(removed), heads,
                        base.structure.n_heads, edited.structure.removed)


def point_row(point: LabPoint, base: Metrics, current: bool) -> dict[str, object]:
    """One history entry as a table row: step, label, every metric, latency against the base
    (ratio, its interval, the FLOP prediction), shares kept, early exits (mean exit layer,
    compute saved with and without the skipped layers' keys and values charged; None
    without an exit step), the recipe as JSON."""
    m, change, exits = point.metrics, point.latency, point.exits
    row: dict[str, object] = {"step": point.step, "current": current, "label": point.label,
                              "edits": len(point.edits), "digest": point.digest}
    row.update({name: getattr(m, name) for name in METRIC_FIELDS})
    row.update(latency_ratio=change.ratio if change else None, latency_ratio_low=change.low if change else None,
               latency_ratio_high=change.high if change else None,
               flops_ratio=change.predicted if change else None)
    row.update(params_kept=m.n_params / base.n_params, size_kept=m.size_bits / base.size_bits,
               mean_exit_layer=exits.mean_exit if exits else None, compute_saved=exits.saved if exits else None,
               compute_saved_oracle=exits.saved_oracle if exits else None)
    row["recipe"] = json.dumps([e.to_dict() for e in point.edits])
    return row


def rows_csv(rows: list[dict[str, object]]) -> str:
    """History rows (`point_row`) as CSV text; empty cells for metrics that do not apply."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return out.getvalue()
