"""Mixed-precision quantization (METHODS §5): how much each layer's quantization alone
costs (sensitivity), then bits per layer that meet a size budget or a tolerated quality
drop, by bisection over the sensitivity order: the k most sensitive layers get the
`high` format, the others the `low` one.

A "layer" here is what a recipe's `scope="layers"` names: a transformer block (all its
linear weights) or an image model's stage, so an allocation is two `Quantize` edits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from analysis.compress.edits import apply_
from analysis.compress.quant.calibration import as_matrix
from analysis.compress.quant.formats import fit_grid, get_format
from analysis.compress.quant.quantize import Quantize, group_for, quantized_weight
from lib import data
from lib.errors import RecipeError
from lib.handle import ModelHandle
from lib.metrics import metrics_from_outputs, model_inputs


def quality_drop(handle: ModelHandle, outputs: torch.Tensor, base: torch.Tensor, batch: data.Batch) -> float:
    """How much worse `outputs` are than `base` on `batch`: KL(base || model) in nats per
    prediction, or for image-to-image models the PSNR lost in dB."""
    edited = metrics_from_outputs(outputs, batch, handle.n_params, handle.size_bits, base)
    if edited.kl_to_base is not None:
        return edited.kl_to_base
    reference = metrics_from_outputs(base, batch, handle.n_params, handle.size_bits)
    return reference.psnr_db - edited.psnr_db


def drop_label(handle: ModelHandle) -> str:
    return "PSNR lost (dB)" if handle.kind == "image-to-image" else "KL(base || model) (nats)"


def layer_units(handle: ModelHandle) -> list[int | str]:
    """Blocks (LMs) or stages (image models) that hold linear weights, in forward order."""
    units: list[int | str] = []
    for name in handle.linear_layers():
        unit, _ = handle.place(name)
        if unit is not None and unit not in units:
            units.append(unit)
    return units


@dataclass(frozen=True)
class Sensitivity:
    """Quality drop when only one layer is quantized to `format`. units: block indices or
    stage names; drops: [n_units] quality drop (`drop_label`) of each; base_bits,
    quantized_bits: [n_units] storage of each unit's linear weights as they are and in `format`."""

    format: str
    group_size: int | None
    units: tuple[int | str, ...]
    drops: tuple[float, ...]
    base_bits: tuple[int, ...]
    quantized_bits: tuple[int, ...]
    label: str

    def order(self) -> list[int | str]:
        """Units from the most to the least sensitive."""
        return [u for _, u in sorted(zip(self.drops, self.units), key=lambda du: -du[0])]


@torch.no_grad()
def sensitivity(handle: ModelHandle, batch: data.Batch | None, fmt: str, group_size: int | None = None,
                progress: Callable[[float, str], None] | None = None) -> Sensitivity:
    """Quantize one layer at a time (round-to-nearest) on a private copy, measure the drop on
    `batch` (None: the evaluation batch),
    put the layer's weights back exactly: one copy, one forward per layer. `progress(fraction,
    message)` is called before each layer."""
    batch = batch or data.default_batch(handle)
    inputs = model_inputs(batch)
    base = handle.forward(inputs)
    copy = handle.private_copy()
    layers = copy.linear_layers()
    drops, before, after = [], [], []
    units = layer_units(copy)
    group = group_for(fmt, layers.values(), group_size)  # the group the allocation's Quantize edits take
    for i, unit in enumerate(units):
        if progress:
            progress(i / len(units), f"only {'block ' if isinstance(unit, int) else ''}{unit} in {fmt}")
        names = [n for n in layers if copy.place(n)[0] == unit]
        saved = {n: layers[n].clone() for n in names}
        bits = 0
        for name in names:
            new, n_bits, _ = quantized_weight(layers[name], fmt, group)
            layers[name].copy_(new)
            bits += n_bits
        drops.append(quality_drop(copy, copy.forward(inputs), base, batch))
        for name in names:
            layers[name].copy_(saved[name])
        before.append(sum(t.numel() * t.element_size() * 8 for t in saved.values()))
        after.append(bits)
    return Sensitivity(fmt, group_size, tuple(layer_units(copy)), tuple(drops), tuple(before), tuple(after),
                       drop_label(handle))


@dataclass(frozen=True)
class Allocation:
    """Formats per unit meeting a goal. formats: per unit of `units`, its format (None: kept
    as it is); size_bits: the whole model's storage; drop: the measured quality drop;
    met: whether the goal is met; evaluations: forwards the search took; edits: the recipe
    steps that build it."""

    units: tuple[int | str, ...]
    formats: tuple[str | None, ...]
    n_high: int
    size_bits: int
    drop: float
    goal: str
    met: bool
    evaluations: int
    edits: tuple[Quantize, ...]


def _edits(order: Sequence[int | str], k: int, low: str, high: str | None, group_size: int | None
           ) -> tuple[Quantize, ...]:
    out = []
    if k < len(order):
        out.append(Quantize(low, "layers", tuple(order[k:]), group_size))
    if k > 0 and high is not None:
        out.append(Quantize(high, "layers", tuple(order[:k])))
    return tuple(out)


def _unit_bits(handle: ModelHandle, unit: int | str, fmt: str | None, group_size: int | None) -> int:
    bits = 0
    layers = handle.linear_layers()
    group = group_for(fmt, layers.values(), group_size) if fmt is not None else None
    for name, weight in layers.items():
        if handle.place(name)[0] == unit:
            stored = handle.storage.get(handle.weight_name(name))
            if fmt is None:
                bits += stored.bits if stored else weight.numel() * weight.element_size() * 8
            else:
                bits += fit_grid(as_matrix(weight), get_format(fmt), group).bits
    return bits


@torch.no_grad()
def allocate(handle: ModelHandle, batch: data.Batch | None, sens: Sensitivity, low: str = "int4",
             high: str | None = "int8", budget_bits: int | None = None, max_drop: float | None = None,
             progress: Callable[[float, str], None] | None = None) -> Allocation:
    """Give the k most sensitive units `high` (None: keep them as they are) and the rest
    `low` (with the sensitivity's group size). With `budget_bits`: the largest k whose
    model size fits (sizes are computed, not measured). With `max_drop`: the smallest k whose
    measured quality drop is at most `max_drop`, by bisection (log2(units) evaluations;
    the drop is taken to fall as k grows). `progress(fraction, message)` before each evaluation."""
    if (budget_bits is None) == (max_drop is None):
        raise RecipeError("Give either a size budget or a tolerated quality drop, not both or neither.")
    low_format, high_format = get_format(low), None if high is None else get_format(high)
    if high_format is not None and high_format.code_bits < low_format.code_bits:
        raise RecipeError(f"The sensitive layers' format {high} ({high_format.code_bits} bits) is narrower than "
                          f"the others' {low} ({low_format.code_bits} bits); pick a high format with at least "
                          f"{low_format.code_bits} bits, or swap the two.")
    batch = batch or data.default_batch(handle)
    order = sens.order()
    low_bits = [_unit_bits(handle, u, low, sens.group_size) for u in order]
    high_bits = [_unit_bits(handle, u, high, None) for u in order]
    now_bits = sum(_unit_bits(handle, u, None, None) for u in order)
    rest = handle.size_bits - now_bits
    size = [rest + sum(high_bits[:k]) + sum(low_bits[k:]) for k in range(len(order) + 1)]
    base = handle.forward(model_inputs(batch))
    measured: dict[int, float] = {}

    at_most = 1 if budget_bits is not None else math.ceil(math.log2(len(order) + 1)) + 1  # evaluations

    def drop(k: int) -> float:
        if k not in measured:
            if progress:
                progress(len(measured) / at_most, f"evaluation {len(measured) + 1} of at most {at_most}")
            copy = handle.private_copy()
            for edit in _edits(order, k, low, high, sens.group_size):
                apply_(copy, edit)
            measured[k] = quality_drop(copy, copy.forward(model_inputs(batch)), base, batch)
        return measured[k]

    if budget_bits is not None:
        fits = [k for k in range(len(order) + 1) if size[k] <= budget_bits]
        k = max(fits) if fits else 0
        met, goal = bool(fits), f"size <= {budget_bits / 8 / 2**20:.3f} MiB"
    else:
        lo, hi = 0, len(order)  # invariant: drop(hi) meets the goal, or hi = len(order)
        while lo < hi:
            mid = (lo + hi) // 2
            if drop(mid) <= max_drop:
                hi = mid
            else:
                lo = mid + 1
        k, goal = lo, f"{sens.label} <= {max_drop:g}"
        met = drop(k) <= max_drop
    formats = {u: (high if i < k else low) for i, u in enumerate(order)}
    return Allocation(tuple(sens.units), tuple(formats[u] for u in sens.units), k, size[k], drop(k), goal, met,
                      len(measured), _edits(order, k, low, high, sens.group_size))
