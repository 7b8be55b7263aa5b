"""Number formats for simulated quantization (METHODS §5): quantize, then dequantize
("fake quant"), so the model runs in float with exactly the values the format can hold.

A weight matrix W [out, in] (a convolution's [out, in, kh, kw] viewed as [out, in * kh * kw])
is cut into scale groups of `group` consecutive columns of each row; every group gets a
scale (and, for asymmetric formats, a zero point) stored in 16 bits. `fit_grid` computes
those scales once; `Grid.quantize` rounds any columns to that fixed grid, so the same grid
serves round-to-nearest and calibrated coordinate descent (QuantEase).

    grid = fit_grid(w, FORMATS["int4"])      # int4, asymmetric, groups of 128
    w_hat = grid.quantize(w)                 # [out, in] on the int4 grid
    grid.bits                                # codes + scales + zero points
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from lib.errors import RecipeError
from lib.storage import quantized_bits

SCALE_BITS = 16  # scales (and the float zero of nothing: zero points are integers) are stored as float16

# NormalFloat 4 (QLoRA): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_CODES = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                          -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                          0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                          0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
_NF4_MIDDLES = (NF4_CODES[1:] + NF4_CODES[:-1]) / 2  # nearest code = bucket between neighbouring middles
_NF4_CELLS = 4096  # a table over [-1, 1] in cells far narrower than any gap between middles
# The code index half a cell below each cell's lower edge: never above the index of a value
# that lands in the cell (float rounding of u + 1 moves u by far less than half a cell), and
# at most one below it, since no two middles are within a cell and a half of each other.
_NF4_GUESS = torch.bucketize(torch.arange(_NF4_CELLS) * (2 / _NF4_CELLS) - 1 - 1 / _NF4_CELLS,
                             _NF4_MIDDLES).to(torch.int32)
_NF4_ABOVE = torch.cat([_NF4_MIDDLES, torch.tensor([float("inf")])])  # the middle above code i


def nf4_index(u: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 code of each value of `u` (in [-1, 1]), exactly what
    `torch.bucketize(u, _NF4_MIDDLES)` returns (the number of middles below u), in about
    a third of its time: a table lookup by cell, then one step up where a middle crosses
    the cell. [same shape], int32."""
    flat = u.reshape(-1)  # one copy if u is a strided view (GPT-2's transposed weights), then none
    cell = flat.add(1).mul_(_NF4_CELLS / 2).to(torch.int32).clamp_(0, _NF4_CELLS - 1)
    index = _NF4_GUESS.index_select(0, cell)
    index += flat > _NF4_ABOVE.index_select(0, index)
    return index.view(u.shape)


@dataclass(frozen=True)
class Minifloat:
    """A small floating-point format: `exp_bits` exponent bits with `bias`, `man_bits`
    mantissa bits, subnormals, largest finite value `max_value` (values beyond saturate)."""

    exp_bits: int
    man_bits: int
    bias: int
    max_value: float

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits


E4M3 = Minifloat(4, 3, 7, 448.0)  # torch.float8_e4m3fn: no infinities, S.1111.111 is NaN
E5M2 = Minifloat(5, 2, 15, 57344.0)  # torch.float8_e5m2: IEEE-like, saturated here instead of inf
E3M2 = Minifloat(3, 2, 3, 28.0)  # OCP FP6 E3M2: no infinities or NaN


def minifloat_round(x: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """Round every value of `x` to the nearest value `fmt` holds (round half to even),
    subnormals included; values beyond ±max saturate to ±max. Same shape, float32.

    frexp gives x = m · 2^e with 0.5 <= |m| < 1, so x lies in the binade [2^(e-1), 2^e),
    where the format's spacing is 2^(e-1-man_bits); below the smallest normal binade the
    spacing stays that of the smallest normal (subnormals). Division and multiplication by
    a power of two are exact, so torch.round (half to even) does the only rounding."""
    x = x.float().clamp(-fmt.max_value, fmt.max_value)
    _, exponent = torch.frexp(x)
    binade = (exponent - 1).clamp_min(1 - fmt.bias)
    step = torch.ldexp(torch.ones_like(x), binade - fmt.man_bits)
    return torch.round(x / step) * step


def minifloat_values(fmt: Minifloat) -> torch.Tensor:
    """Every finite non-negative value of `fmt`, ascending: [n]."""
    values = [0.0]
    for e in range(1 - fmt.bias, fmt.bias + 2 ** fmt.exp_bits):
        for m in range(2 ** fmt.man_bits):
            if e == 1 - fmt.bias:  # subnormals share the smallest normal binade's spacing
                values.append(m * 2.0 ** (e - fmt.man_bits))
            v = (1 + m / 2 ** fmt.man_bits) * 2.0 ** e
            if v <= fmt.max_value:
                values.append(v)
    return torch.tensor(sorted(set(values)))


@dataclass(frozen=True)
class QuantFormat:
    """A weight format. scheme: "int" (symmetric integers in [qmin, qmax], scale =
    absmax / qmax), "int-asym" (integers in [0, qmax] with a zero point), "nf4" (nearest
    NormalFloat code times the absmax), "float" (minifloat of `minifloat`, scale = absmax /
    its max), "binary" (alpha · sign(w), alpha = mean |w|). group: default columns per
    scale group (0: the whole row, -1: one scale for the whole tensor)."""

    name: str
    label: str
    code_bits: int
    scheme: str
    group: int
    qmin: int = 0
    qmax: int = 0
    minifloat: Minifloat | None = None
    activations: bool = False  # inputs of linear layers can be quantized in this format too

    @property
    def zero_point(self) -> bool:
        return self.scheme == "int-asym"


FORMATS: dict[str, QuantFormat] = {f.name: f for f in (
    QuantFormat("int8", "INT8 per output channel", 8, "int", 0, -127, 127, activations=True),
    QuantFormat("int4", "INT4 asymmetric", 4, "int-asym", 128, 0, 15),
    QuantFormat("int4-sym", "INT4 symmetric", 4, "int", 128, -8, 7),
    QuantFormat("nf4", "NF4", 4, "nf4", 64),
    QuantFormat("fp8-e4m3", "FP8 E4M3", 8, "float", -1, minifloat=E4M3, activations=True),
    QuantFormat("fp8-e5m2", "FP8 E5M2", 8, "float", -1, minifloat=E5M2, activations=True),
    QuantFormat("fp6-e3m2", "FP6 E3M2", 6, "float", 0, minifloat=E3M2),
    QuantFormat("binary", "binary (sign · mean |w|)", 1, "binary", 0),
)}


def get_format(name: str) -> QuantFormat:
    """The format called `name`; an unknown name is a RecipeError listing the known ones."""
    if name not in FORMATS:
        raise RecipeError(f"Unknown quantization format {name!r}; the formats are {', '.join(FORMATS)}.")
    return FORMATS[name]


def group_columns(fmt: QuantFormat, row: int, group_size: int | None = None) -> int:
    """Columns per scale group for rows of length `row`; -1 for one scale per tensor.

    An explicit `group_size` must divide `row` (a RecipeError says which sizes do). The
    format's default group is used where it divides the row; otherwise its largest divisor
    below the default (the zoo's 160-wide rows get int4 groups of 80), or the whole row
    when that divisor would be under a quarter of the default."""
    if group_size is not None:
        if row % group_size:
            near = [d for d in range(1, row + 1) if row % d == 0 and d <= 4 * group_size][-4:]
            raise RecipeError(f"A group of {group_size} does not divide rows of length {row}; "
                              f"group sizes that do include {', '.join(map(str, near))}.")
        return group_size
    if fmt.group <= 0 or fmt.group >= row:
        return fmt.group if fmt.group < 0 else row
    divisor = max(d for d in range(1, fmt.group + 1) if row % d == 0)
    return divisor if divisor * 4 >= fmt.group else row


def common_group(fmt: QuantFormat, rows: Iterable[int]) -> int:
    """The largest group size up to the format's default that divides every row length in
    `rows`: a group the user can start from in any scope (code-lm's rows of 160 and 640
    give int4 80, not its default 128)."""
    common = math.gcd(*rows)
    return max(d for d in range(1, fmt.group + 1) if common % d == 0)


def _half(scale: torch.Tensor) -> torch.Tensor:
    """Scales as stored: rounded to float16 (clamped to its finite range)."""
    return scale.clamp(max=65504.0).to(torch.float16).float()


@dataclass(frozen=True)
class Grid:
    """The fixed grid of one weight matrix [out, in]: `scale` [out, n_groups] ([1, 1] when
    `per_tensor`) over groups of `group` columns, `zero` [out, n_groups] integer zero points
    (asymmetric formats) or None."""

    fmt: QuantFormat
    group: int
    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: tuple[int, int]
    per_tensor: bool = False

    @property
    def n_scales(self) -> int:
        return self.scale.numel()

    @property
    def bits(self) -> int:
        """Storage: a code per weight plus a 16-bit scale (and a zero point of code width) per group."""
        out, cols = self.shape
        return quantized_bits(out * cols, self.fmt.code_bits, self.n_scales, SCALE_BITS,
                              self.fmt.code_bits if self.fmt.zero_point else 0)

    @property
    def description(self) -> str:
        """Short storage label, e.g. "int4 g128", "int8 per-row", "fp8-e4m3 per-tensor"."""
        if self.per_tensor:
            where = "per-tensor"
        elif self.group == self.shape[1]:
            where = "per-row"
        else:
            where = f"g{self.group}"
        return f"{self.fmt.name} {where}"

    def _expand(self, t: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Per-group values [rows, n_groups] -> per-column [rows, len(cols)] for columns `cols`."""
        return t[:, (cols // self.group).clamp(max=t.shape[1] - 1)]

    def _cols(self, w: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
        return torch.arange(w.shape[1]) if cols is None else cols

    def _params(self, shape: tuple[int, ...], cols: torch.Tensor | None
                ) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor | None]:
        """How to lay out a matrix of `shape` and the scales (zero points) that broadcast over
        it: the whole matrix as [out, n_groups, group] against [out, n_groups, 1] (no per-weight
        copies of the scales), chosen columns as [out, k] against [out, k]."""
        if cols is None:
            grouped = (shape[0], -1, self.group)
            zero = self.zero[..., None] if self.fmt.zero_point else None
            return grouped, self.scale[..., None], zero
        zero = self._expand(self.zero, cols) if self.fmt.zero_point else None
        return shape, self._expand(self.scale, cols), zero

    def codes(self, w: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """What is stored for the columns `cols` (default: all) of the matrix, given as `w`
        [out, len(cols)]: integer codes (int formats), NF4 code indices 0..15, minifloat
        values in scale units, or ±1 (binary)."""
        layout, scale, zero = self._params(w.shape, cols)
        return _codes(self.fmt, w.reshape(layout), scale, zero).reshape(w.shape)

    def dequantize(self, codes: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Codes of the columns `cols` (default: all) -> weights [out, len(cols)] in the model's units."""
        layout, scale, zero = self._params(codes.shape, cols)
        return _dequantize(self.fmt, codes.reshape(layout), scale, zero).reshape(codes.shape)

    def quantize(self, w: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Round the columns `cols` (default: all) of a weight matrix, given as `w`
        [out, len(cols)], to this grid: [out, len(cols)] float32."""
        layout, scale, zero = self._params(w.shape, cols)
        w = w.float().reshape(layout)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        if self.fmt.scheme in ("int", "int-asym"):  # w/s, round, clamp, *s: four passes, no index tensors
            lo, hi = (self.fmt.qmin, self.fmt.qmax) if zero is None else (-zero, self.fmt.qmax - zero)
            return (w / safe).round_().clamp_(lo, hi).mul_(scale).reshape(w.shape[:1] + (-1,))
        if self.fmt.scheme == "nf4":
            index = nf4_index((w / safe).clamp_(-1, 1))
            values = NF4_CODES.index_select(0, index.reshape(-1)).view(index.shape)
            return values.mul_(scale).reshape(w.shape[:1] + (-1,))
        codes = _codes(self.fmt, w, scale, zero)
        return _dequantize(self.fmt, codes, scale, zero, in_place=True).reshape(w.shape[:1] + (-1,))

    def column_rounder(self) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """`round(v, j)`: values v [out] of column j rounded to column j's grid, [out]; the
        per-column scales are laid out once, so one call is a handful of vector operations
        (QuantEase makes one per column per sweep)."""
        cols = torch.arange(self.shape[1])
        scale = self._expand(self.scale, cols).T.contiguous()  # [in, out or 1]
        zero = self._expand(self.zero, cols).T.contiguous() if self.fmt.zero_point else None
        if self.fmt.scheme in ("int", "int-asym"):  # the fused form of `quantize`
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            lo = torch.full_like(scale, self.fmt.qmin) if zero is None else -zero
            hi = torch.full_like(scale, self.fmt.qmax) if zero is None else self.fmt.qmax - zero

            def round_int(v: torch.Tensor, j: int) -> torch.Tensor:
                return (v / safe[j]).round_().clamp_(lo[j], hi[j]).mul_(scale[j])

            return round_int

        def round_column(v: torch.Tensor, j: int) -> torch.Tensor:
            z = None if zero is None else zero[j]
            return _dequantize(self.fmt, _codes(self.fmt, v, scale[j], z), scale[j], z, in_place=True)

        return round_column

    def code_values(self) -> torch.Tensor:
        """The grid in scale units (what `w / scale`, or `w / scale + zero`, is rounded to): [n]."""
        f = self.fmt
        if f.scheme in ("int", "int-asym"):
            return torch.arange(f.qmin, f.qmax + 1, dtype=torch.float32)
        if f.scheme == "nf4":
            return NF4_CODES.clone()
        if f.scheme == "float":
            pos = minifloat_values(f.minifloat)
            return torch.cat([-pos.flip(0)[:-1], pos])
        return torch.tensor([-1.0, 1.0])

    def scaled(self, w: torch.Tensor) -> torch.Tensor:
        """`w` [out, in] in scale units (w / scale, plus the zero point), where `code_values` lie."""
        cols = self._cols(w, None)
        s = self._expand(self.scale, cols)
        u = w.float() / torch.where(s > 0, s, torch.ones_like(s))
        return u + self._expand(self.zero, cols) if self.fmt.zero_point else u


def _codes(fmt: QuantFormat, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """Codes of `w` given its scales `s` and zero points `z` (broadcastable to `w`)."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if fmt.scheme == "binary":
        return torch.where(w >= 0, 1.0, -1.0)  # sign(0) = +1
    u = w / safe  # a fresh tensor: the steps below work in place on it
    if fmt.scheme == "int":
        return u.round_().clamp_(fmt.qmin, fmt.qmax)
    if fmt.scheme == "int-asym":
        return u.round_().add_(z).clamp_(fmt.qmin, fmt.qmax)
    if fmt.scheme == "nf4":
        return nf4_index(u.clamp_(-1, 1)).float()
    return _round_minifloat(u, fmt.minifloat)


_TORCH_FLOAT8 = {E4M3: torch.float8_e4m3fn, E5M2: torch.float8_e5m2}


def _round_minifloat(u: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """`minifloat_round`, through torch's own float8 cast where torch has the format (the
    same values, a third of the time: tests check the generic rounding against the casts)."""
    if fmt in _TORCH_FLOAT8:
        return u.clamp_(-fmt.max_value, fmt.max_value).to(_TORCH_FLOAT8[fmt]).float()
    return minifloat_round(u, fmt)


def _dequantize(fmt: QuantFormat, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
                in_place: bool = False) -> torch.Tensor:
    if fmt.scheme == "nf4":
        return NF4_CODES[codes.long()].mul_(s)
    if not in_place:
        codes = codes.clone()
    return (codes.sub_(z) if fmt.scheme == "int-asym" else codes).mul_(s)


def fit_grid(w: torch.Tensor, fmt: QuantFormat, group_size: int | None = None) -> Grid:
    """Scales (and zero points) of `fmt` for the weight matrix `w` [out, in] (METHODS §5 rules)."""
    out, cols = w.shape
    group = group_columns(fmt, cols, group_size)
    w = w.detach().float()
    if fmt.scheme == "binary":
        scale = torch.linalg.vector_norm(w.reshape(out, cols // group, group), ord=1, dim=-1) / group  # mean |w|
        return Grid(fmt, group, _half(scale), None, (out, cols))
    # one pass for min and max of every group: [rows, n_groups] each
    lo, hi = w.aminmax() if group < 0 else w.reshape(out, cols // group, group).aminmax(dim=-1)
    lo, hi = lo.reshape(-1, 1) if group < 0 else lo, hi.reshape(-1, 1) if group < 0 else hi
    zero = None
    if fmt.scheme == "int-asym":  # 0 stays on the grid, so pruned zeros stay zeros
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = _half((hi - lo) / fmt.qmax)
        zero = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(0, fmt.qmax)
    else:
        largest = {"int": fmt.qmax, "nf4": 1.0}.get(fmt.scheme) or fmt.minifloat.max_value  # of the code range
        scale = torch.maximum(-lo, hi) / largest
    return Grid(fmt, cols if group < 0 else group, _half(scale), zero, (out, cols), per_tensor=group < 0)


def fake_quantize(w: torch.Tensor, fmt: QuantFormat | str, group_size: int | None = None) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of a weight matrix `w` [out, in]: [out, in] float32."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    return fit_grid(w, fmt, group_size).quantize(w)


def relative_mse(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||w - w_hat||^2 / ||w||^2."""
    return float((w.double() - w_hat.double()).pow(2).sum() / w.double().pow(2).sum())


# ---------------------------------------------------------------------- activations


def quantize_activations(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Dynamic activation quantization of a linear layer's input x (same shape): INT8 per
    token (each row of the last dimension; a convolution's input [b, c, h, w] per sample),
    FP8 with one scale for the whole tensor. Scales are computed on the fly, in float32."""
    xf = x.float()
    rows = xf.reshape(xf.shape[0], -1) if x.dim() == 4 else xf.reshape(-1, xf.shape[-1])  # [tokens, features]
    if fmt.scheme == "int":
        s = rows.abs().amax(-1, keepdim=True) / fmt.qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(rows / s).clamp(fmt.qmin, fmt.qmax) * s
    elif fmt.scheme == "float":
        s = rows.abs().amax() / fmt.minifloat.max_value
        s = s if s > 0 else torch.ones_like(s)
        q = _round_minifloat(rows / s, fmt.minifloat) * s
    else:
        raise RecipeError(f"Activations are quantized to {', '.join(n for n, f in FORMATS.items() if f.activations)} "
                          f"only, not {fmt.name}.")
    return q.reshape(x.shape).to(x.dtype)
