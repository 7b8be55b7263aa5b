"""How much each layer can lose (METHODS §4): per-layer sparsities chosen by
rate-distortion dynamic programming or by an evolutionary search, applied as one
recipe edit.

    curves = distortion_curves(handle, tokens)          # prune one layer at a time, K levels
    plan = allocate(curves, sparsity=0.5)               # DP, then exactly half of the weights
    edit = plan.edit()                                  # LayerSparsity, a recipe edit
    search = evolve(handle, tokens, curves, 0.5, generations=10)   # EvoPress-style, from plan
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from analysis.compress.edits import Edit, applies, cut, edit_type, require
from analysis.compress.prune.pruning import _zero_smallest_magnitude_, scoped_layers, storage_view
from lib.errors import AnalysisError, RecipeError, require_int, require_type
from lib.handle import ModelHandle, Point, check_handle
from lib.progress import Progress

DP_UNITS = 2000  # the DP counts all the weights in about this many units (a budget s in s * DP_UNITS)


@edit_type("layer_sparsity")
@dataclass(frozen=True)
class LayerSparsity(Edit):
    """Magnitude pruning with its own sparsity per linear layer: ((name, sparsity), ...)."""

    sparsities: tuple
    method: str = "allocated"

    def __post_init__(self) -> None:
        require(isinstance(self.sparsities, tuple) and len(self.sparsities) > 0,
                "A per-layer sparsity edit lists (layer, sparsity) pairs.")
        for pair in self.sparsities:
            require(isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
                    and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool) and 0 <= pair[1] < 1,
                    f"Each entry is (layer name, sparsity in [0, 1)), not {pair!r}.")
        twice = sorted(name for name, n in Counter(name for name, _ in self.sparsities).items() if n > 1)
        require(not twice, f"A per-layer sparsity edit names each layer once; {', '.join(twice[:3])} "
                           "appear(s) more than once. Keep one sparsity per layer.")

    @property
    def label(self) -> str:
        mean = sum(s for _, s in self.sparsities) / len(self.sparsities)
        return f"{self.method} per-layer sparsity ({len(self.sparsities)} layers, mean {mean:.0%})"


@applies(LayerSparsity)
@torch.no_grad()
def _layer_sparsity(handle: ModelHandle, edit: LayerSparsity) -> None:
    layers = handle.linear_layers()
    unknown = [name for name, _ in edit.sparsities if name not in layers]
    if unknown:
        raise RecipeError(f"This model has no linear layer(s) {', '.join(cut(str(n)) for n in unknown[:3])}.")
    for name, sparsity in edit.sparsities:
        w = layers[name]
        _zero_smallest_magnitude_(w, round(sparsity * w.numel()))


@dataclass(frozen=True)
class DistortionCurves:
    """layers: prunable linear layers; sizes: [L] weights each; levels: [K] sparsities;
    distortion: [L, K] mean squared change of the output logits with only that layer
    pruned (magnitude) to that level (METHODS §4, rate-distortion)."""

    layers: list[str]
    sizes: torch.Tensor
    levels: torch.Tensor
    distortion: torch.Tensor


def _block(handle: ModelHandle, name: str) -> int | None:
    layer, _ = handle.place(name)
    return layer if isinstance(layer, int) else None


@torch.no_grad()
def distortion_curves(handle: ModelHandle, inputs: torch.Tensor, n_levels: int = 20, scope: str = "all",
                      progress: Progress | None = None) -> DistortionCurves:
    """Prune each layer alone to each of `n_levels` levels (0, 1/K, ..., (K-1)/K) and
    measure the logits' mean squared change. For LMs a layer's curve reruns only the
    blocks from that layer on, from the cached residual stream entering it."""
    check_handle(handle)
    if isinstance(n_levels, bool) or not isinstance(n_levels, int) or not 2 <= n_levels <= 1000:
        raise AnalysisError(f"A distortion curve needs n_levels to be a whole number from 2 (the unpruned layer and "
                            f"one pruned level) to 1,000, not {n_levels!r}. 20 levels is the usual choice."[:300])
    inputs = handle.check_inputs(inputs)
    if not inputs.numel():
        raise AnalysisError("The calibration inputs are empty; pass at least one row (e.g. batch.tokens[:2]).")
    layers = scoped_layers(handle, scope)
    copy = handle.private_copy()
    weights = {n: w for n, w in copy.linear_layers().items() if n in layers}
    base = handle.forward(inputs).float()
    lm = handle.kind == "causal-lm"
    resid = {}
    if lm:
        L = handle.structure.n_layers
        resid = handle.record(inputs, [Point("resid_pre", l) for l in range(L)])
    levels = torch.arange(n_levels, dtype=torch.float64) / n_levels
    distortion = torch.zeros(len(weights), n_levels, dtype=torch.float64)
    for i, (name, weight) in enumerate(weights.items()):
        original = weight.clone()
        block = _block(copy, name) if lm else None
        flat = storage_view(weight)
        if flat is None:
            raise AnalysisError(f"The weight of {name} is not a plain view of its storage.")
        order = flat.abs().sort(stable=True).indices  # one sort: the levels prune a growing prefix of it
        pruned = 0
        for k, level in enumerate(levels.tolist()[1:], start=1):
            count = round(level * weight.numel())
            flat[order[pruned:count]] = 0
            pruned = count
            if block is None:
                out = copy.forward(inputs)
            else:
                h = resid[Point("resid_pre", block)]
                for layer in range(block, handle.structure.n_layers):
                    h = copy.blocks.run(layer, h)
                out = copy.blocks.readout(h)
            distortion[i, k] = (out.float() - base).pow(2).mean().item()
        weight.copy_(original)
        if progress:
            progress((i + 1) / len(weights), f"distortion curve of {name}")
    sizes = torch.tensor([w.numel() for w in weights.values()])
    return DistortionCurves(list(weights), sizes, levels, distortion)


@dataclass(frozen=True)
class Allocation:
    """A per-layer plan: sparsities [L] float64, the share of each layer's weights pruned
    (pruned / size, so `edit()` zeroes exactly those counts); predicted: the summed
    single-layer distortions, each read off its layer's curve (linear between the measured
    levels); sparsity: the share of all the plan's weights pruned."""

    layers: list[str]
    sparsities: torch.Tensor
    predicted: float
    sparsity: float
    method: str = "rate-distortion"

    def edit(self) -> LayerSparsity:
        # Unrounded: round(s * size) must give back each layer's exact count, also for layers of millions.
        return LayerSparsity(tuple((n, float(s)) for n, s in zip(self.layers, self.sparsities)), self.method)


def _check_budget(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 < sparsity < 1:
        raise AnalysisError(f"The global sparsity is a fraction in (0, 1), not {sparsity!r}.")


def _level_counts(curves: DistortionCurves) -> torch.Tensor:
    """[L, K] weights each level prunes in each layer, rounded as `distortion_curves` and
    `LayerSparsity` round them (each row non-decreasing)."""
    return (curves.sizes[:, None].double() * curves.levels[None, :]).round().long()


def _target(curves: DistortionCurves, sparsity: float) -> int:
    """round(sparsity * all the curves' weights): the weights a plan at `sparsity` prunes.
    Refused when the curves' last level cannot reach it."""
    _check_budget(sparsity)
    target = round(sparsity * int(curves.sizes.sum()))
    if sparsity > float(curves.levels[-1]) or target > int(_level_counts(curves)[:, -1].sum()):
        raise AnalysisError(f"The curves stop at {float(curves.levels[-1]):.0%} per layer; "
                            f"{sparsity:.0%} overall cannot be reached.")
    return target


def _segment(steps: list[int], distortion: list[float], count: int, up: bool) -> tuple[float, int] | None:
    """The straight piece of one layer's curve (pruned weights `steps` [K] -> `distortion`
    [K]) just above `count` pruned weights (`up`) or just below it: (distortion per weight
    along it, weights from `count` to its end), or None at the end of the curve. Pieces of
    zero width (levels that round to one count in a small layer) are stepped over."""
    j = bisect.bisect_right(steps, count) if up else bisect.bisect_left(steps, count)
    if j == (len(steps) if up else 0):
        return None
    slope = (distortion[j] - distortion[j - 1]) / (steps[j] - steps[j - 1])
    return slope, (steps[j] - count if up else count - steps[j - 1])


def _distortion_at(steps: list[int], distortion: list[float], count: int) -> float:
    """One layer's curve at `count` pruned weights (0 <= count <= steps[-1]), linear between levels."""
    j = bisect.bisect_left(steps, count)
    if steps[j] == count:
        return distortion[j]
    share = (count - steps[j - 1]) / (steps[j] - steps[j - 1])
    return distortion[j - 1] + share * (distortion[j] - distortion[j - 1])


def _plan(curves: DistortionCurves, counts: list[int], method: str) -> Allocation:
    """The Allocation pruning `counts` [L] weights of each layer."""
    steps, distortion, sizes = _level_counts(curves).tolist(), curves.distortion.tolist(), curves.sizes.tolist()
    predicted = sum(_distortion_at(s, d, c) for s, d, c in zip(steps, distortion, counts))
    sparsities = torch.tensor([c / n for c, n in zip(counts, sizes)], dtype=torch.float64)
    return Allocation(curves.layers, sparsities, predicted, sum(counts) / sum(sizes), method)


def _dp_levels(curves: DistortionCurves, target: int, bins: int) -> torch.Tensor:
    """Dynamic programming over layers: [L] level indices with the least summed distortion
    (additivity: D ~ sum_l D_l(s_l)) among the plans that prune at least `target` weights,
    counted in `bins` units of target / bins weights each (units that divide the budget,
    each level's count rounded to the nearest unit). O(L * K * bins)."""
    unit = target / bins
    cost = (_level_counts(curves).double() / unit).round().long()  # [L, K] units each level prunes
    need, n_levels = bins, len(curves.levels)
    inf = float("inf")
    best = torch.full((need + 1,), inf, dtype=torch.float64)  # best[p]: least distortion, p units pruned
    best[0] = 0.0  # (p == need collects every plan that meets the budget)
    picks, sources = [], []
    for l in range(len(curves.layers)):
        new = torch.full_like(best, inf)
        pick = torch.zeros(need + 1, dtype=torch.long)
        source = torch.zeros(need + 1, dtype=torch.long)
        for k in range(n_levels):
            c = int(cost[l, k])
            cand = torch.full_like(best, inf)
            src = torch.zeros(need + 1, dtype=torch.long)
            if c < need:
                cand[c:need] = best[:need - c]
                src[c:need] = torch.arange(need - c)
            tail = best[max(0, need - c):]  # every p from which this level reaches the budget
            j = int(tail.argmin())
            cand[need], src[need] = tail[j], max(0, need - c) + j
            cand += float(curves.distortion[l, k])
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, k), pick)
            source = torch.where(better, src, source)
        picks.append(pick)
        sources.append(source)
        best = new
    if best[need] == inf:  # the budget is within the units' rounding of every layer at its last level
        return torch.full((len(curves.layers),), n_levels - 1)
    levels, p = [], need
    for l in range(len(curves.layers) - 1, -1, -1):  # walk back from the full budget
        levels.append(int(picks[l][p]))
        p = int(sources[l][p])
    return torch.tensor(levels[::-1])


def _exact_counts(curves: DistortionCurves, levels: torch.Tensor, target: int) -> list[int]:
    """Per-layer pruned counts [L] that sum to exactly `target`, starting from `levels` [L]:
    the levels' rounding and granularity leave the total a little off, so the remainder is
    pruned where the curves (linear between levels) rise least per weight, or given back
    where they rise most. Each step ends a piece of some curve or the remainder, so this
    takes at most L * K steps."""
    steps, distortion = _level_counts(curves).tolist(), curves.distortion.tolist()
    counts = [steps[l][k] for l, k in enumerate(levels.tolist())]
    excess = sum(counts) - target
    while excess:
        up = excess < 0
        pieces = {l: piece for l in range(len(counts))  # (slope, room) of each layer that can still move
                  if (piece := _segment(steps[l], distortion[l], counts[l], up)) is not None}
        l = (min if up else max)(pieces, key=lambda layer: pieces[layer][0])
        move = min(pieces[l][1], abs(excess))
        counts[l] += move if up else -move
        excess += move if up else -move
    return counts


def allocate(curves: DistortionCurves, sparsity: float, units: int = DP_UNITS) -> Allocation:
    """Rate-distortion allocation (METHODS §4) that prunes exactly round(sparsity * total)
    weights: the DP chooses one level per layer with the budget counted in about
    sparsity * `units` units, then `_exact_counts` moves the rounding remainder between
    layers so the realised global sparsity is the target to the weight."""
    require_type(curves, DistortionCurves, "The distortion curves")
    units = require_int(units, "The allocation's budget units", 1, 10**6)
    target = _target(curves, sparsity)
    bins = max(1, min(target, round(sparsity * units)))  # a unit is never under one weight
    levels = _dp_levels(curves, target, bins) if target else torch.zeros(len(curves.layers), dtype=torch.long)
    return _plan(curves, _exact_counts(curves, levels, target), "rate-distortion")


@torch.no_grad()
def measured_distortion(handle: ModelHandle, inputs: torch.Tensor, plan: Allocation) -> float:
    """The distortion the curves predict a sum of, measured: the logits' (outputs') mean
    squared change with every layer pruned as `plan` says at once, on `inputs`."""
    copy = handle.private_copy()
    _layer_sparsity(copy, plan.edit())
    return float((copy.forward(inputs).float() - handle.forward(inputs).float()).pow(2).mean())


def uniform(curves: DistortionCurves, sparsity: float) -> Allocation:
    """Every layer at the same sparsity, as `Magnitude(sparsity)` per layer prunes it (the
    baseline the allocation should beat: give it the allocation's realised `sparsity`, so
    both prune the same share to within one weight per layer)."""
    _target(curves, sparsity)  # refuses a sparsity beyond the curves
    counts = (curves.sizes.double() * sparsity).round().long()  # [L], each rounded as Magnitude rounds it
    return _plan(curves, counts.tolist(), "uniform")


@dataclass
class Search:
    """An evolutionary search's state: best levels so far, its KL to the base on the
    fixed selection batch, and the best-so-far curve [generation] (never rises)."""

    layers: list[str]
    levels: torch.Tensor
    best_kl: float
    curve: list[float] = field(default_factory=list)

    def allocation(self, curves: DistortionCurves) -> Allocation:
        """The plan of the best levels: whole levels, so at least the budget, not exactly it."""
        counts = _level_counts(curves)[torch.arange(len(self.levels)), self.levels]  # [L]
        return _plan(curves, counts.tolist(), "evolutionary")


@torch.no_grad()
def kl_of_levels(base: ModelHandle, inputs: torch.Tensor, curves: DistortionCurves, levels: torch.Tensor,
                 base_logits: torch.Tensor) -> float:
    """KL(base || pruned) per position on `inputs`, averaged, with each layer at its level
    (`base_logits`: the base's outputs on `inputs`)."""
    copy = base.private_copy()
    layers = copy.linear_layers()
    for name, k in zip(curves.layers, levels.tolist()):
        w = layers[name]
        _zero_smallest_magnitude_(w, round(float(curves.levels[k]) * w.numel()))
    logq = torch.log_softmax(copy.forward(inputs).float(), -1)
    logp = torch.log_softmax(base_logits.float(), -1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def evolve(base: ModelHandle, selection: torch.Tensor, fresh: Callable[[int], torch.Tensor],
           curves: DistortionCurves, sparsity: float, generations: int = 10, offspring: int = 8,
           seed: int = 0, start: Allocation | None = None, progress: Progress | None = None,
           stop: Callable[[], bool] | None = None, on_generation: Callable[[Search], None] | None = None
           ) -> Search:
    """EvoPress-style search over per-layer levels. Each generation mutates the best plan
    by moving one level from one layer to another (kept only if it still prunes at least
    round(sparsity * total) weights),
    screens the offspring by KL to the base on a fresh batch `fresh(generation)`, and
    keeps the best screened one if it also beats the incumbent on the fixed `selection`
    batch, so the best-so-far KL never rises. Deterministic for a seed. `stop()` is asked
    before each generation; `on_generation(search)` gets a snapshot after each one (what a
    caller keeps if the search is interrupted)."""
    target = _target(curves, sparsity)
    rng = random.Random(seed)
    plan = start or allocate(curves, sparsity)
    steps = _level_counts(curves)  # [L, K]
    # The search moves whole levels: start each layer at the first level pruning at least as much as the plan.
    counts = (plan.sparsities.double() * curves.sizes).round().long()  # [L]
    levels = torch.searchsorted(steps, counts[:, None]).squeeze(1)
    base_selection = base.forward(selection)
    state = Search(curves.layers, levels, kl_of_levels(base, selection, curves, levels, base_selection))
    state.curve.append(state.best_kl)
    K, L = len(curves.levels), len(curves.layers)

    def meets(candidate: torch.Tensor) -> bool:
        return int(steps[torch.arange(L), candidate].sum()) >= target

    for g in range(generations):
        if stop is not None and stop():
            break
        children = []
        for _ in range(offspring * 4):
            if len(children) == offspring:
                break
            up, down = rng.sample(range(L), 2)
            child = state.levels.clone()
            if child[up] + 1 >= K or child[down] == 0:
                continue
            child[up] += 1
            child[down] -= 1
            if meets(child):
                children.append(child)
        if children:
            batch = fresh(g)
            reference = base.forward(batch)
            screened = min(children, key=lambda c: kl_of_levels(base, batch, curves, c, reference))
            kl = kl_of_levels(base, selection, curves, screened, base_selection)
            if kl < state.best_kl:
                state.levels, state.best_kl = screened, kl
        state.curve.append(state.best_kl)
        if on_generation:
            on_generation(Search(state.layers, state.levels.clone(), state.best_kl, list(state.curve)))
        if progress:
            progress((g + 1) / generations, f"generation {g + 1}: best KL {state.best_kl:.4g}")
    return state
