"""Quantized weights as stored in an exported checkpoint: the lab keeps a quantized weight
as its dequantized float values (`Grid.quantize`), so the export finds the grid again from
those values (`infer_grid`), checks that codes x scales give back every value bit for bit,
and writes them in the most widely loadable form:

- compressed-tensors (`ct_tensors`): INT8, INT4 (symmetric or with zero points) and FP8
  E4M3, as the tensors `transformers.from_pretrained` reads through its compressed-tensors
  quantizer (int8 `weight`, int32-packed `weight_packed`, float8 `weight`, float32
  `weight_scale`, int8 `weight_zero_point`). The lab's scale groups are the "block"
  strategy: [1, group] on an nn.Linear's [out, in], [group, 1] on GPT-2's Conv1D [in, out].
- LayerScope's packed codes (`packed_tensors`, read back by `lib.packed`): every other
  format (NF4, FP6, FP8 E5M2, binary), as bit-packed indices into the format's grid.

A weight whose values are not on any grid this finds (QuantEase codes that never reach the
grid's ends, LLM.int8's 16-bit columns, a later edit that moved it off the grid) is not
stored quantized; the caller keeps it in float and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from analysis.compress.quant.formats import FORMATS, Grid, QuantFormat

# lab format -> (compressed-tensors weight type, bits, symmetric)
CT_FORMATS = {"int8": ("int", 8, True), "int4-sym": ("int", 4, True), "int4": ("int", 4, False),
              "fp8-e4m3": ("float", 8, True)}
CT_SHIFT = {"int4": 8}  # compressed-tensors' int4 codes are signed [-8, 7]; the lab's asymmetric ones [0, 15]


@dataclass(frozen=True)
class Layout:
    """How one stored weight is laid out: `fmt` (a lab format name), `group` columns per
    scale group of the [out, in] matrix (`per_tensor`: one scale), `transposed` where the
    checkpoint stores [in, out] (GPT-2's Conv1D)."""

    fmt: str
    group: int
    per_tensor: bool
    transposed: bool


def parse_label(label: str, cols: int) -> tuple[str, int, bool] | None:
    """A storage label ("int4 g80", "int8 per-row", "fp8-e4m3 per-tensor") as (format,
    group, per_tensor) for rows of `cols` inputs; None for a label that is no single grid
    (LLM.int8's split) or a group that does not divide the row."""
    parts = label.split()
    if len(parts) != 2 or parts[0] not in FORMATS:
        return None
    if parts[1] in ("per-row", "per-tensor"):
        return parts[0], cols, parts[1] == "per-tensor"
    if parts[1].startswith("g") and parts[1][1:].isdigit():
        group = int(parts[1][1:])
        return (parts[0], group, False) if group > 0 and cols % group == 0 else None
    return None


def infer_grid(matrix: torch.Tensor, fmt: QuantFormat, group: int, per_tensor: bool) -> Grid:
    """The grid whose dequantized values `matrix` [out, in] holds, from the values alone:
    each group's extreme values sit on the ends of the format's range (round-to-nearest puts
    them there), so e.g. an INT8 group's scale is max |w| / 127, exactly (a small integer
    times a float16 scale is exact in float32, and so is dividing it back)."""
    out, cols = matrix.shape
    w = matrix.float().reshape(1, 1, -1) if per_tensor else matrix.float().reshape(out, cols // group, group)
    zero = None
    if fmt.scheme == "int-asym":
        # hi - lo spans qmax steps, or one or two fewer: hi / s and -lo / s are rounded apart
        # (7.496 and 7.494 round to 7 + 7), so each group takes the first span that fits it
        hi, lo = w.amax(-1).clamp(min=0), w.amin(-1).clamp(max=0)  # [out, n_groups]
        scale, zero = torch.zeros_like(hi), torch.zeros_like(hi)
        todo = torch.ones_like(hi, dtype=torch.bool)
        for steps in (fmt.qmax, fmt.qmax - 1, fmt.qmax - 2):
            s = (hi - lo) / steps
            safe = torch.where(s > 0, s, torch.ones_like(s))
            z = torch.round(-lo / safe).clamp(0, fmt.qmax)
            back = ((w / safe[..., None]).round() + z[..., None]).clamp(0, fmt.qmax).sub(z[..., None]) * s[..., None]
            fits = todo & (back == w).all(-1)
            scale, zero, todo = torch.where(fits, s, scale), torch.where(fits, z, zero), todo & ~fits
        first = (hi - lo) / fmt.qmax  # groups no span fits: the plain guess (the caller's check refuses it)
        scale = torch.where(todo, first, scale)
        zero = torch.where(todo, torch.round(-lo / torch.where(first > 0, first, torch.ones_like(first))), zero)
    else:
        largest = {"int": fmt.qmax, "nf4": 1.0, "binary": 1.0}.get(fmt.scheme) or fmt.minifloat.max_value
        scale = w.abs().amax(-1) / largest
    return Grid(fmt, cols if per_tensor else group, scale.reshape(1, 1) if per_tensor else scale, zero, (out, cols),
                per_tensor=per_tensor)


def codes_for(weight: torch.Tensor, layout: Layout) -> tuple[Grid, torch.Tensor] | None:
    """(grid, codes [out, in]) that give back `weight` (the checkpoint's tensor, in its own
    layout and dtype) exactly, or None where no grid does."""
    matrix = (weight.T if layout.transposed else weight).float()
    grid = infer_grid(matrix, FORMATS[layout.fmt], layout.group, layout.per_tensor)
    codes = grid.codes(matrix)
    back = grid.dequantize(codes)
    return (grid, codes) if torch.equal(back.to(weight.dtype).float(), matrix) else None


def _scales(grid: Grid) -> torch.Tensor:
    """Scales as stored: float32 (the lab's float16 values, exactly), 1 where a group is all
    zero (its codes are zero points, so any scale gives zeros; compressed-tensors divides by it)."""
    return torch.where(grid.scale > 0, grid.scale, torch.ones_like(grid.scale)).float()


def ct_scheme(layout: Layout, shape: tuple[int, ...], row_block: int = 0) -> dict[str, Any]:
    """The compressed-tensors weight arguments of `layout` for a checkpoint tensor of `shape`.
    A per-row grid (one group per row) gets blocks of `row_block` inputs when that is wider:
    compressed-tensors pads a weight to whole blocks, so one block width serves rows of every
    length (transformers reads one scheme per checkpoint)."""
    kind, bits, symmetric = CT_FORMATS[layout.fmt]
    args: dict[str, Any] = {"num_bits": bits, "type": kind, "symmetric": symmetric}
    if layout.per_tensor:
        args["strategy"] = "tensor"
        return args
    cols = shape[0] if layout.transposed else shape[1]
    group = max(row_block, cols) if layout.group == cols else layout.group
    args["strategy"] = "block"
    args["block_structure"] = [group, 1] if layout.transposed else [1, group]
    return args


def ct_format(layout: Layout) -> str:
    kind, bits, _ = CT_FORMATS[layout.fmt]
    return "float-quantized" if kind == "float" else "int-quantized" if bits == 8 else "pack-quantized"


def ct_tensors(weight: torch.Tensor, layout: Layout, row_block: int = 0) -> dict[str, torch.Tensor] | None:
    """The compressed-tensors tensors of one weight (local names: weight / weight_packed,
    weight_scale, weight_zero_point, weight_shape), checked by decompressing them with
    compressed-tensors itself; None where the weight is on no grid or the check fails."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    found = codes_for(weight, layout)
    if found is None:
        return None
    grid, _ = found
    args = QuantizationArgs(**ct_scheme(layout, tuple(weight.shape), row_block))
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format=ct_format(layout))
    matrix = grid.dequantize(grid.codes((weight.T if layout.transposed else weight).float()))  # [out, in]
    scale = _scales(grid).reshape(1) if layout.per_tensor else _scales(grid)
    state = {"weight": matrix.T.contiguous() if layout.transposed else matrix,
             "weight_scale": scale if layout.per_tensor or not layout.transposed else scale.T.contiguous()}
    if grid.zero is not None:
        zero = (grid.zero - CT_SHIFT.get(layout.fmt, 0)).to(torch.int8)
        state["weight_zero_point"] = zero.T.contiguous() if layout.transposed else zero
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    stored = {k: v.contiguous() for k, v in compressor.compress(state, scheme).items()}
    back = compressor.decompress(dict(stored), scheme)["weight"]
    if back.shape != weight.shape or not torch.equal(back.to(weight.dtype).float(), weight.float()):
        return None
    return stored


def packed_tensors(weight: torch.Tensor, layout: Layout) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """LayerScope's packed tensors of one weight (local names codes, table, scale, zero; see
    `lib.packed`) and its metadata, or None where the weight is on no grid."""
    from lib.packed import dequantize_packed, pack_bits

    found = codes_for(weight, layout)
    if found is None:
        return None
    grid, codes = found
    table = grid.code_values().float()  # [n] ascending
    if grid.fmt.scheme == "nf4":  # its codes are already indices into the table
        index = codes.reshape(-1).long()
    else:  # codes are the grid's values (integers, minifloat values, ±1): their places in it
        index = torch.searchsorted(table, codes.reshape(-1).float().contiguous()).clamp(max=len(table) - 1)
        if not torch.equal(table[index], codes.reshape(-1).float()):
            return None
    bits = max(1, math.ceil(math.log2(len(table))))
    tensors = {"codes": pack_bits(index, bits), "table": table, "scale": grid.scale.float().contiguous()}
    if grid.zero is not None:
        tensors["zero"] = grid.zero.float().contiguous()
    meta = {"shape": list(weight.shape), "transposed": layout.transposed, "bits": bits, "group": grid.group,
            "dtype": str(weight.dtype).replace("torch.", ""), "format": layout.fmt}
    back = dequantize_packed({f"w.{k}": v for k, v in tensors.items()}, {"w": meta})["w"]
    return (tensors, meta) if torch.equal(back, weight) else None


def stored_bits(tensors: dict[str, torch.Tensor]) -> int:
    """Bits the tensors take on disk (their data, not the file's header)."""
    return sum(t.numel() * t.element_size() * 8 for t in tensors.values())
