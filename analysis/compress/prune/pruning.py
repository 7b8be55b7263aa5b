"""Pruning edits (METHODS §4): unstructured magnitude and Wanda pruning of linear
weights; structured removal of attention heads, of attention / MLP sublayers or whole
blocks (`Drop`), and unified layer skipping for a target speed-up.

A dropped part contributes nothing to the residual stream (its output, bias
included, is zero): dropping block l gives y_l = x_l, attention l gives m_l = x_l,
MLP l gives y_l = m_l; a dropped image stage passes its input through. `Drop` is
both the recipe edit and the address the Redundancy view's drop sweep uses.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Sequence

import torch

from analysis.compress.edits import Edit, applies, calibration_forward, edit_type, is_int, require
from lib.errors import RecipeError
from lib.handle import ModelHandle

DROP_KINDS = ("block", "attention", "mlp", "stage")
SCOPES = ("all", "attention", "mlp", "layers")
PER = ("layer", "global")


def _check_sparsity_and_scope(edit: Edit) -> None:
    require(isinstance(edit.sparsity, (int, float)) and not isinstance(edit.sparsity, bool)
            and 0 <= edit.sparsity < 1, f"A {edit.type} sparsity is a fraction in [0, 1), not {edit.sparsity!r}.")
    check_scope(edit)


def check_scope(edit: Edit) -> None:
    """Refuse an edit whose `scope` and `layers` fields (see `scoped_layers`) do not fit."""
    name = edit.type
    require(edit.scope in SCOPES, f"A {name} scope is one of {', '.join(SCOPES)}, not {edit.scope!r}.")
    require(isinstance(edit.layers, tuple), f"A {name} edit's layers are a list, not {edit.layers!r}.")
    if edit.scope == "layers":
        require(len(edit.layers) > 0, f"A {name} edit with scope 'layers' needs at least one layer.")
        require(all(is_int(x) and x >= 0 or isinstance(x, str) and x for x in edit.layers),
                f"A {name} edit's layers are block indices or stage names, not {edit.layers!r}.")
    else:
        require(edit.layers == (), f"A {name} edit lists layers only with scope 'layers'.")


@edit_type("magnitude")
@dataclass(frozen=True)
class Magnitude(Edit):
    """Unstructured magnitude pruning: zero the `sparsity` share of weights with the
    smallest |w| in the linear layers of `scope` ("all", "attention", "mlp" or "layers":
    the blocks or stages in `layers`), per layer or against one global threshold."""

    sparsity: float
    scope: str = "all"
    layers: tuple = ()
    per: str = "layer"

    def __post_init__(self) -> None:
        _check_sparsity_and_scope(self)
        require(self.per in PER, f"Magnitude pruning is per {' or '.join(PER)}, not {self.per!r}.")

    @property
    def label(self) -> str:
        where = self.scope if self.scope != "layers" else "layers " + ", ".join(map(str, self.layers))
        return f"magnitude {self.sparsity:.0%} ({where}, {'global threshold' if self.per == 'global' else 'per layer'})"


@edit_type("wanda")
@dataclass(frozen=True)
class Wanda(Edit):
    """Wanda: zero, in each output row, the `sparsity` share of weights with the smallest
    |w_ij| · ||X_j||_2 (input-activation norms from the evaluation batch)."""

    sparsity: float
    scope: str = "all"
    layers: tuple = ()

    def __post_init__(self) -> None:
        _check_sparsity_and_scope(self)

    @property
    def label(self) -> str:
        where = self.scope if self.scope != "layers" else "layers " + ", ".join(map(str, self.layers))
        return f"Wanda {self.sparsity:.0%} ({where})"

    def calibration_forwards(self, handle: ModelHandle, positions: int) -> float:
        return 1.0  # the input norms' forward


@edit_type("remove_heads")
@dataclass(frozen=True)
class RemoveHeads(Edit):
    """Remove attention heads of one layer: their query, key and value rows and their
    output-projection columns are cut out, so the layer really shrinks."""

    layer: int
    heads: tuple

    def __post_init__(self) -> None:
        require(is_int(self.layer) and self.layer >= 0, f"A layer index >= 0, not {self.layer!r}.")
        require(isinstance(self.heads, tuple) and len(self.heads) > 0 and all(is_int(h) and h >= 0 for h in self.heads)
                and len(set(self.heads)) == len(self.heads),
                f"Heads to remove are distinct head indices >= 0, not {self.heads!r}.")

    @property
    def label(self) -> str:
        return f"remove heads {', '.join(map(str, sorted(self.heads)))} of layer {self.layer}"


SPEEDUP_DENOMINATOR = 10**6  # a speed-up is read as the nearest fraction with at most this denominator


def skip_count(n_layers: int, speedup: float) -> int:
    """K = round(L / r), the number of blocks unified layer skipping keeps (METHODS §4),
    rounded once and float-safe: r is read as the nearest fraction with denominator <= 10^6
    (so 1.2 and 1.2000000000000002 are both 6/5) and L / r is rounded half up exactly
    (L=3, r=2 -> 1.5 -> 2). The only place K is computed: the edit, its check and the lab's
    caption all call it. Raises RecipeError unless 2 <= K <= L."""
    if isinstance(speedup, bool) or not (isinstance(speedup, (int, float)) and math.isfinite(speedup) and speedup > 0):
        raise RecipeError(f"A speed-up is a finite number > 0, not {speedup!r}.")
    ratio = n_layers / Fraction(speedup).limit_denominator(SPEEDUP_DENOMINATOR)  # exact L / r
    k = math.floor(ratio + Fraction(1, 2))  # half up, not Python's half-to-even round
    if k < 2:
        most = (200 * n_layers // 3) / 100  # r <= L / 1.5 keeps 2; floored so that the bound shown is allowed
        raise RecipeError(f"A speed-up of {speedup:g} would keep fewer than 2 of {n_layers} layers "
                          f"(round({n_layers} / {speedup:g}) = {k}); the most this model allows is {most:g}.")
    if k > n_layers:
        raise RecipeError(f"A speed-up of {speedup:g} would keep {k} of {n_layers} layers; "
                          "a speed-up below 1 keeps more layers than there are.")
    return k


def kept_layers(n_layers: int, speedup: float) -> list[int]:
    """Unified layer skipping (METHODS §4): the K = `skip_count` blocks kept, spread evenly
    over the whole depth, kept_i = ceil(i (L-1) / (K-1)) for i = 0..K-1 in integer
    arithmetic: blocks 0 and L-1 stay and the gaps between kept blocks differ by at most one,
    so no run of skipped blocks piles up at the top. L=12, r=2 -> [0, 3, 5, 7, 9, 11]."""
    k = skip_count(n_layers, speedup)
    return [-(-i * (n_layers - 1) // (k - 1)) for i in range(k)]  # -(-a // b) is ceil(a / b)


@edit_type("skip_layers")
@dataclass(frozen=True)
class SkipLayers(Edit):
    """Unified layer skipping for a target speed-up r: keep the K = round(L / r) blocks
    `kept_layers` chooses (`skip_count` rounds) and remove the others."""

    speedup: float

    def __post_init__(self) -> None:
        require(isinstance(self.speedup, (int, float)) and not isinstance(self.speedup, bool) and self.speedup > 1,
                f"A speed-up is a number > 1, not {self.speedup!r}.")

    @property
    def label(self) -> str:
        return f"skip layers for {self.speedup:g}x speed-up"

    def check(self, handle: ModelHandle) -> None:
        require(handle.kind == "causal-lm", "Layer skipping applies to transformer blocks; this model has none.")
        kept_layers(handle.structure.n_layers, self.speedup)


@edit_type("drop")
@dataclass(frozen=True)
class Drop(Edit):
    """Remove one part: kind "block" | "attention" | "mlp" with a layer index, or
    "stage" with an image model's stage name."""

    kind: str
    layer: int | str

    def __post_init__(self) -> None:
        require(self.kind in DROP_KINDS, f"A drop's kind is one of {', '.join(DROP_KINDS)}, not {self.kind!r}.")
        if self.kind == "stage":
            require(isinstance(self.layer, str) and bool(self.layer),
                    f"A stage drop names the stage (e.g. 'conv2'), not {self.layer!r}.")
        else:
            require(is_int(self.layer) and self.layer >= 0,
                    f"A {self.kind} drop needs a layer index >= 0, not {self.layer!r}.")

    @property
    def part(self) -> str:
        """What is dropped, e.g. "attention 3" or "stage conv2"."""
        return f"{self.kind} {self.layer}"

    @property
    def label(self) -> str:
        return f"drop {self.part}"

    def check(self, handle: ModelHandle) -> None:
        reason = handle.drop_problem(self)
        if reason:
            raise RecipeError(reason)


@applies(Drop)
def _remove(handle: ModelHandle, edit: Drop) -> None:
    handle.remove_(edit)


@contextmanager
def dropping(handle: ModelHandle, drops: Sequence[Drop]) -> Iterator[ModelHandle]:
    """Inside the block, `handle` runs with `drops` removed through hooks (the weights
    are untouched; the hooks go on exit, also when the body raises). Duplicates count once."""
    with handle.dropping(list(dict.fromkeys(drops))):
        yield handle


# ---------------------------------------------------------------------- applying


def scoped_layers(handle: ModelHandle, scope: str, layers: tuple = ()) -> dict[str, torch.Tensor]:
    """The linear weights [out, in, ...] an edit with this scope acts on. The unembedding
    is left out (on most LMs it is tied to the embedding, and pruning it prunes both)."""
    weights, places = {}, []
    for name, weight in handle.linear_layers().items():
        layer, sublayer = handle.place(name)
        if layer is None:  # the unembedding
            continue
        places += [] if layer in places else [layer]
        if scope == "all" or scope == sublayer or scope == "layers" and layer in layers:
            weights[name] = weight
    missing = [x for x in layers if x not in places] if scope == "layers" else []
    if missing:
        known = (f"blocks 0..{len(places) - 1}" if places == list(range(len(places)))
                 else "layers " + ", ".join(map(str, places)))
        raise RecipeError(f"This model has no layer {', '.join(map(str, missing))}; it has {known}. "
                          "Pick layers from that list.")
    if not weights:
        where = scope if scope != "layers" else f"layers {', '.join(map(str, layers))}"
        raise RecipeError(f"This model has no prunable linear layers in scope '{where}'.")
    return weights


_SAMPLE = 1 << 16  # entries sampled to bracket the k-th smallest value
_CHUNK = 1 << 16  # entries counted at a time: a chunk stays in cache across the comparisons


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th smallest value (1-based) of a 1-d tensor. A fixed-seed sample brackets
    it; one cache-sized pass counts the entries below the bracket and keeps the few inside,
    and a selection among those finds it (some 3x cheaper than a selection over all n).
    Falls back to the full selection when the bracket misses, so the answer is always exact."""
    n = flat.numel()
    if n <= 4 * _SAMPLE:
        return flat.kthvalue(k).values
    sample = flat[torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(0))]
    q, spread = k / n, 6 * math.sqrt(k / n * (1 - k / n) / _SAMPLE) + 2 / _SAMPLE
    lo = sample.kthvalue(max(1, int((q - spread) * _SAMPLE))).values
    hi = sample.kthvalue(min(_SAMPLE, int((q + spread) * _SAMPLE) + 1)).values
    below, inside = 0, []
    for chunk in flat.split(_CHUNK):
        below += int((chunk < lo).sum())
        inside.append(chunk[(chunk >= lo) & (chunk <= hi)])
    kept = torch.cat(inside)
    if below < k <= below + kept.numel():
        return kept.kthvalue(k - below).values
    return flat.kthvalue(k).values


def smallest_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask of exactly k entries of `score` (any shape) holding its k smallest
    values: everything below the k-th smallest value, then the first entries equal to it."""
    flat = score.reshape(-1)
    if k <= 0:
        return torch.zeros(score.shape, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones(score.shape, dtype=torch.bool)
    kth = kth_smallest(flat, k)
    mask = flat < kth
    missing = k - int(mask.sum())
    if missing:
        mask[(flat == kth).nonzero().view(-1)[:missing]] = True
    return mask.view(score.shape)


def storage_view(weight: torch.Tensor) -> torch.Tensor | None:
    """A 1-d view of `weight`'s entries in storage order (GPT-2's [out, in] layers are
    transposes of contiguous [in, out] tensors), or None when it is no plain view. Writes
    through it edit the layer; per-layer edits that ignore the layout read it without a copy."""
    alias = weight if weight.is_contiguous() or weight.dim() != 2 else weight.T
    return alias.view(-1) if alias.is_contiguous() else None


def _zero_smallest_(weight: torch.Tensor, score: torch.Tensor, k: int) -> None:
    """Zero the k entries of `weight` with the smallest `score` (same shape), exactly k."""
    if k > 0:
        weight.masked_fill_(smallest_mask(score, k), 0)


def _zero_smallest_magnitude_(weight: torch.Tensor, k: int) -> None:
    """Zero the k entries of `weight` with the smallest |w|, exactly k (ties: first in
    storage order), in storage order so that a transposed view costs no copy."""
    flat = storage_view(weight)
    if flat is None:
        _zero_smallest_(weight, weight.abs(), k)
    elif k > 0:
        flat.masked_fill_(smallest_mask(flat.abs(), k), 0)


@applies(Magnitude)
@torch.no_grad()
def _magnitude(handle: ModelHandle, edit: Magnitude) -> None:
    weights = scoped_layers(handle, edit.scope, edit.layers)
    if edit.per == "layer":
        for w in weights.values():
            _zero_smallest_magnitude_(w, round(edit.sparsity * w.numel()))
        return
    scores = torch.cat([w.abs().reshape(-1) for w in weights.values()])  # one global threshold
    k = round(edit.sparsity * scores.numel())
    if k == 0:
        return
    mask = smallest_mask(scores, k)
    start = 0
    for w in weights.values():
        w.masked_fill_(mask[start:start + w.numel()].view(w.shape), 0)
        start += w.numel()


@applies(Wanda)
@torch.no_grad()
def _wanda(handle: ModelHandle, edit: Wanda) -> None:
    """Wanda (Sun et al. 2023): score |W_ij| · ||X_j||_2, prune per output row."""
    from lib.data import default_batch
    from lib.metrics import model_inputs

    weights = scoped_layers(handle, edit.scope, edit.layers)
    with calibration_forward(handle):
        norms = handle.input_norms(model_inputs(default_batch(handle)), list(weights))
    for name, w in weights.items():
        score = w.reshape(w.shape[0], -1).abs() * norms[name][None, :]  # [out, in (* kh * kw)]
        _zero_smallest_rowwise_(w, score, round(edit.sparsity * score.shape[1]))


def _zero_smallest_rowwise_(weight: torch.Tensor, score: torch.Tensor, k: int) -> None:
    """In each output row of `weight` [out, ...], zero the k entries with the smallest
    `score` [out, in (* kh * kw)]."""
    if k <= 0:
        return
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    weight.masked_fill_(mask.view(weight.shape), 0)


@applies(RemoveHeads)
def _remove_heads(handle: ModelHandle, edit: RemoveHeads) -> None:
    handle.remove_heads_(edit.layer, edit.heads)


@applies(SkipLayers)
def _skip_layers(handle: ModelHandle, edit: SkipLayers) -> None:
    kept = set(kept_layers(handle.structure.n_layers, edit.speedup))
    for layer in range(handle.structure.n_layers):
        if layer not in kept and f"block {layer}" not in handle.structure.removed:
            handle.remove_(Drop("block", layer))
