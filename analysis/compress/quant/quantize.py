"""Quantization edits (METHODS §5), simulated exactly on CPU: the weights of a private copy
are replaced by their quantize-dequantize values, `handle.storage` records what they take
stored (codes + scales + zero points), and activation quantization becomes part of the
copy's forward (`handle.set_input_transform_`).

    Quantize("int4")                                  # INT4 asymmetric, groups of 128, every layer
                                                      # (or the one size below that divides every row)
    Quantize("int8", scope="mlp", activations=True)   # W8A8: int8 weights and per-token int8 inputs
    Quantize("nf4", method="quantease")               # calibrated on the evaluation batch
    LLMInt8(threshold=6.0)                            # int8 with outlier input columns in 16-bit

The number formats themselves live in `formats`; QuantEase in `calibration`; sensitivity
and mixed precision in `mixed_precision` (all in `analysis.compress.quant`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from analysis.compress.edits import Edit, applies, calibration_forward, edit_type, is_int, positions_of, require
from analysis.compress.prune.pruning import check_scope, scoped_layers
from analysis.compress.quant.calibration import as_matrix, calibration_grams, quantease, quantease_work
from analysis.compress.quant.formats import (
    FORMATS,
    NF4_CODES,
    SCALE_BITS,
    QuantFormat,
    common_group,
    fit_grid,
    get_format,
    group_columns,
    quantize_activations,
    relative_mse,
)
from lib.errors import RecipeError
from lib.handle import ModelHandle
from lib.progress import told_here
from lib.storage import StoredAs, quantized_bits

METHODS = ("rtn", "quantease")
ACTIVATION_FORMATS = tuple(name for name, f in FORMATS.items() if f.activations)


def _where(edit: Edit) -> str:
    return edit.scope if edit.scope != "layers" else "layers " + ", ".join(map(str, edit.layers))


@edit_type("quantize")
@dataclass(frozen=True)
class Quantize(Edit):
    """Quantize the linear (and convolution) weights in `scope` to `format` (one of
    `FORMATS`), with scale groups of `group_size` columns (None: the format's own
    granularity), by round-to-nearest ("rtn") or QuantEase ("quantease", calibrated on the
    evaluation batch); with `activations`, the inputs of those layers are quantized too
    (int8 per token, fp8 per tensor)."""

    format: str
    scope: str = "all"
    layers: tuple = ()
    group_size: int | None = None
    activations: bool = False
    method: str = "rtn"

    def __post_init__(self) -> None:
        require(isinstance(self.format, str) and self.format in FORMATS,
                f"Unknown quantization format {self.format!r}; the formats are {', '.join(FORMATS)}.")
        check_scope(self)
        require(self.group_size is None or is_int(self.group_size) and self.group_size >= 1,
                f"A group size is a whole number of columns >= 1 (or none), not {self.group_size!r}.")
        require(isinstance(self.activations, bool), f"activations is true or false, not {self.activations!r}.")
        require(not self.activations or self.format in ACTIVATION_FORMATS,
                f"Activations are quantized to {', '.join(ACTIVATION_FORMATS)} only; {self.format} is for weights.")
        require(self.method in METHODS, f"A quantization method is one of {', '.join(METHODS)}, not {self.method!r}.")

    @property
    def label(self) -> str:
        group = f" g{self.group_size}" if self.group_size else ""
        extra = (" weights+activations" if self.activations else "") + (" QuantEase" if self.method != "rtn" else "")
        return f"quantize {self.format}{group}{extra} ({_where(self)})"

    def calibration_forwards(self, handle: ModelHandle, positions: int) -> float:
        if self.method != "quantease":
            return 0.0
        forwards, solves = quantease_work(handle, list(scoped_layers(handle, self.scope, self.layers)), positions)
        return forwards + sum(solves)

    def check(self, handle: ModelHandle) -> None:
        fmt = FORMATS[self.format]
        for name, weight in scoped_layers(handle, self.scope, self.layers).items():
            try:
                group_columns(fmt, weight[0].numel(), self.group_size)
            except RecipeError as e:
                raise RecipeError(f"{name}: {e}") from None


@edit_type("llm_int8")
@dataclass(frozen=True)
class LLMInt8(Edit):
    """LLM.int8 (Dettmers et al. 2022): int8 weights per output row and int8 inputs per
    token, except the input feature columns where some |x| >= `threshold` on the evaluation
    batch: those columns (of inputs and weights) stay in 16-bit."""

    threshold: float = 6.0
    scope: str = "all"
    layers: tuple = ()

    def __post_init__(self) -> None:
        require(isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool)
                and self.threshold >= 0, f"The outlier threshold is a number >= 0, not {self.threshold!r}.")
        check_scope(self)

    @property
    def label(self) -> str:
        return f"LLM.int8 threshold {self.threshold:g} ({_where(self)})"

    def calibration_forwards(self, handle: ModelHandle, positions: int) -> float:
        return 1.0  # the outlier columns' forward


# ---------------------------------------------------------------------- input transforms


@dataclass(frozen=True)
class QuantizedInput:
    """A linear layer's input, quantized on the fly to `format` (int8 per token, fp8 per tensor)."""

    format: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_activations(x, FORMATS[self.format])


@dataclass(frozen=True)
class OutlierSplit:
    """LLM.int8's input: the feature `columns` (channels, for a convolution) stay as they
    are, the others are int8 per token over those columns alone."""

    columns: tuple[int, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dim = 1 if x.dim() == 4 else x.dim() - 1
        keep = torch.zeros(x.shape[dim], dtype=torch.bool)
        keep[list(self.columns)] = True
        keep = keep.view([-1 if d == dim else 1 for d in range(x.dim())])
        regular = quantize_activations(x.masked_fill(keep, 0), FORMATS["int8"])
        return torch.where(keep, x, regular)


def split_int8_weight(weight: torch.Tensor, columns: Sequence[int]) -> tuple[torch.Tensor, int]:
    """LLM.int8's weight [out, in, ...]: input `columns` as they are, the rest int8 per output
    row (scale from those columns alone). Returns the new weight (same shape) and its
    storage in bits (int8 codes, 16-bit outlier columns, a 16-bit scale per row)."""
    w = as_matrix(weight)  # [out, in * kh * kw]
    per_column = w.shape[1] // weight.shape[1]  # kernel positions of each input channel
    keep = torch.zeros(weight.shape[1], dtype=torch.bool)
    keep[list(columns)] = True
    keep = keep.repeat_interleave(per_column)[None, :]  # [1, in * kh * kw]
    regular = w.masked_fill(keep, 0)
    new = torch.where(keep, w, fit_grid(regular, FORMATS["int8"]).quantize(regular))
    n_kept = int(keep.sum()) * w.shape[0]
    bits = quantized_bits(w.numel() - n_kept, 8, w.shape[0], SCALE_BITS) + 16 * n_kept
    return new.view(weight.shape), bits


def llm_int8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold: float
                    ) -> torch.Tensor:
    """One linear layer under LLM.int8: x [..., in], weight [out, in] -> [..., out]. Columns of
    x with some |x| >= `threshold` (in this x) and the matching weight columns stay as they
    are; the rest are int8 (x per token, weight per row)."""
    columns = outlier_columns_of(x, threshold)
    w, _ = split_int8_weight(weight, columns)
    return torch.nn.functional.linear(OutlierSplit(columns)(x), w.to(x.dtype), bias)


def outlier_columns_of(x: torch.Tensor, threshold: float) -> tuple[int, ...]:
    """Feature columns (last dim; channels of [b, c, h, w]) where some |x| >= threshold."""
    dim = 1 if x.dim() == 4 else x.dim() - 1
    peak = x.abs().amax(dim=[d for d in range(x.dim()) if d != dim])
    return tuple((peak >= threshold).nonzero().flatten().tolist())


@dataclass(frozen=True)
class OutlierReport:
    """LLM.int8's outlier columns per layer on a batch. layers: linear layer names;
    columns: per layer, the input feature columns with some |x| >= threshold; widths:
    per layer, its number of input features; peaks: per layer, the largest |x|."""

    threshold: float
    layers: tuple[str, ...]
    columns: tuple[tuple[int, ...], ...]
    widths: tuple[int, ...]
    peaks: tuple[float, ...]


@torch.no_grad()
def find_outliers(handle: ModelHandle, inputs: torch.Tensor | None, names: Sequence[str], threshold: float
                  ) -> OutlierReport:
    """Outlier input columns of the linear layers `names` on `inputs` [batch, ...] (None: the
    model's evaluation batch), as the model is now: one forward, the inputs read (not
    changed) on the way."""
    from lib.data import default_batch
    from lib.metrics import model_inputs

    inputs = model_inputs(default_batch(handle)) if inputs is None else inputs
    peaks: dict[str, torch.Tensor] = {}

    def reader(name: str):
        def read(x: torch.Tensor) -> None:
            dim = 1 if x.dim() == 4 else x.dim() - 1
            peak = x.detach().abs().float().amax(dim=[d for d in range(x.dim()) if d != dim])  # [in]
            peaks[name] = peak if name not in peaks else torch.maximum(peaks[name], peak)

        return read

    with handle.transforming_inputs({n: reader(n) for n in names}), calibration_forward(handle):
        handle.forward(inputs)
    columns = tuple(tuple((peaks[n] >= threshold).nonzero().flatten().tolist()) for n in names)
    return OutlierReport(threshold, tuple(names), columns, tuple(len(peaks[n]) for n in names),
                         tuple(float(peaks[n].max()) for n in names))


# ---------------------------------------------------------------------- applying


def quantized_weight(weight: torch.Tensor, fmt: str, group_size: int | None = None,
                     sigma: torch.Tensor | None = None) -> tuple[torch.Tensor, int, str]:
    """One layer's weight [out, in, ...] on the grid of `fmt`: by round-to-nearest, or by
    QuantEase given calibration Σ [in, in]. Returns the dequantized weight (same shape and
    dtype), its storage in bits and a storage label ("int4 g128")."""
    w = as_matrix(weight)
    if fmt == "nf4":  # its table lookups read flat tensors: one copy of a transposed view (GPT-2), then views
        w = w.contiguous()
    grid = fit_grid(w, get_format(fmt), group_size)
    new = grid.quantize(w) if sigma is None else quantease(w, sigma, grid)
    return new.view(weight.shape).to(weight.dtype), grid.bits, grid.description


def shared_group(fmt: QuantFormat, rows: Iterable[int]) -> int | None:
    """The one group size that layers with rows of the lengths `rows` take when none is
    asked: the format's default where it divides every row, else the largest size below it
    that does (code-lm's rows of 160 and 640 share groups of 80), so a model quantized in
    one step has one group size, as deployment formats store it (an exported checkpoint
    then holds one compressed-tensors scheme). None where each layer takes `group_columns`'
    own: every row fits in one default group (one scale per row everywhere), the shared
    size would be under a quarter of the default (a CNN's 9-wide rows), or the format has
    no groups."""
    rows = [int(r) for r in rows]
    if fmt.group <= 0 or not rows or max(rows) <= fmt.group:
        return None
    group = common_group(fmt, rows)
    return group if group * 4 >= fmt.group else None


def group_for(fmt: str, weights: Iterable[torch.Tensor], group_size: int | None = None) -> int | None:
    """The group size layers of `weights` are quantized with together: `group_size` when
    asked, else the one their rows share (`shared_group`; None: each layer its own)."""
    return group_size if group_size is not None else shared_group(get_format(fmt), [w[0].numel() for w in weights])


@applies(Quantize)
@torch.no_grad()
def _quantize(handle: ModelHandle, edit: Quantize) -> None:
    weights = scoped_layers(handle, edit.scope, edit.layers)
    grams, tell, done = {}, told_here(), []
    if edit.method == "quantease":  # the bar: its forwards, then each layer's solve, by their work
        from lib.data import default_batch
        from lib.metrics import model_inputs

        inputs = model_inputs(default_batch(handle))
        forwards, solves = quantease_work(handle, list(weights), positions_of(inputs))
        done = list(itertools.accumulate([forwards, *solves], initial=0.0))
        grams = calibration_grams(handle, inputs, list(weights), share=forwards / done[-1])
    group = group_for(edit.format, weights.values(), edit.group_size)
    for i, (name, weight) in enumerate(weights.items()):
        new, bits, label = quantized_weight(weight, edit.format, group, grams.pop(name, None))
        weight.copy_(new)
        handle.storage[handle.weight_name(name)] = StoredAs(bits, label)
        if tell and done:
            tell(done[i + 2] / done[-1], f"QuantEase: layer {i + 1} of {len(weights)}")
    if edit.activations:
        for name in weights:
            handle.set_input_transform_(name, QuantizedInput(edit.format))


@applies(LLMInt8)
@torch.no_grad()
def _llm_int8(handle: ModelHandle, edit: LLMInt8) -> None:
    weights = scoped_layers(handle, edit.scope, edit.layers)
    report = find_outliers(handle, None, list(weights), edit.threshold)
    for (name, weight), columns in zip(weights.items(), report.columns):
        new, bits = split_int8_weight(weight, columns)
        weight.copy_(new.to(weight.dtype))
        handle.storage[handle.weight_name(name)] = StoredAs(bits, f"llm.int8 ({len(columns)} columns 16-bit)")
        handle.set_input_transform_(name, OutlierSplit(columns))


# ---------------------------------------------------------------------- one layer's grid


@dataclass(frozen=True)
class GridHistogram:
    """One layer's weights in units of their group's scale (`unit` says which: w / scale,
    plus the zero point for asymmetric formats), where every group's grid is the same:
    edges [bins + 1], counts [bins] of the weights; grid [n] the format's values inside the
    weights' range; rel_mse: the layer's relative squared error in this format."""

    layer: str
    format: str
    description: str
    unit: str
    edges: tuple[float, ...]
    counts: tuple[int, ...]
    grid: tuple[float, ...]
    rel_mse: float


@torch.no_grad()
def layer_histogram(handle: ModelHandle, layer: str, fmt: str, group_size: int | None = None, bins: int = 120
                    ) -> GridHistogram:
    """The histogram of linear layer `layer`'s weights with the grid of `fmt` over it."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise RecipeError(f"A histogram needs bins to be a whole number of at least 1, not {bins!r}; "
                          "120 bins is the usual choice.")
    layers = handle.linear_layers()
    if layer not in layers:
        raise RecipeError(f"The model has no linear layer {layer!r}; its layers are {', '.join(list(layers)[:6])}, ...")
    w = as_matrix(layers[layer])
    grid = fit_grid(w, get_format(fmt), group_size)
    scaled = grid.scaled(w).flatten()
    lo, hi = float(scaled.min()), float(scaled.max())
    counts = torch.histc(scaled, bins, lo, hi if hi > lo else lo + 1)
    edges = torch.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    values = grid.code_values()
    codes = grid.codes(w)
    used = NF4_CODES[codes.long()] if grid.fmt.scheme == "nf4" else codes  # in scale units, like `scaled`
    lo, hi = min(lo, float(used.min())), max(hi, float(used.max()))  # a grid value some weight rounds to is shown
    inside = values[(values >= lo) & (values <= hi)]
    unit = {"int": "w / scale", "int-asym": "w / scale + zero point", "nf4": "w / absmax of its block",
            "float": "w / scale", "binary": "w / mean |w| of its group"}[grid.fmt.scheme]
    return GridHistogram(layer, fmt, grid.description, unit, tuple(edges.tolist()), tuple(int(c) for c in counts),
                         tuple(inside.tolist()), relative_mse(w, grid.quantize(w)))
