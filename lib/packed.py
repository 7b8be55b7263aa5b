"""LayerScope's packed weights: quantized weights in formats that no loader of plain
transformers reads (NF4 without bitsandbytes, FP6 E3M2, FP8 E5M2, binary), stored as
bit-packed code indices + scales, and the small loader that turns them back into a plain
float checkpoint folder.

An exported folder with packed weights holds, besides config.json and model.safetensors
(every other tensor), `layerscope-packed.safetensors` with, for each packed weight `K`
(its name in the checkpoint, e.g. `model.layers.0.mlp.up_proj.weight`):

    K.codes  uint8 [ceil(out * in * bits / 8)]  code indices, `bits` each, little-endian bit order
    K.table  float32 [n]                         the format's grid in scale units (index -> value)
    K.scale  float32 [out, n_groups]             a scale per group of `group` consecutive inputs
    K.zero   float32 [out, n_groups]             zero points (asymmetric formats only)

and in the file's metadata, under "layerscope", a JSON object K -> {"shape": the tensor's
shape in the checkpoint, "transposed": true where the checkpoint stores [in, out] (GPT-2's
Conv1D), "bits", "group", "dtype"}. A weight is W [out, in] = (table[codes] - zero) * scale
over its groups, exactly the values the lab computed with (same float32 arithmetic).

    from lib.packed import load_packed
    model = load_packed("exported-folder")          # a transformers model, weights in float
    unpack_folder("exported-folder", "float-copy")  # or: a plain folder any loader reads
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lib.errors import NoCheckpointError

PACKED_FILE = "layerscope-packed.safetensors"
WEIGHTS_FILE = "model.safetensors"
META_KEY = "layerscope"


def pack_bits(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Code indices (any shape, values in [0, 2^bits)) as a flat uint8 tensor of
    ceil(n * bits / 8) bytes: each index's `bits` lowest bits in turn, little-endian."""
    flat = indices.reshape(-1).to(torch.uint8).numpy()
    planes = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]  # [n, bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack_bits`: [n] int64 indices."""
    planes = np.unpackbits(packed.numpy(), bitorder="little")[: n * bits].reshape(n, bits)
    padded = np.zeros((n, 8), dtype=np.uint8)
    padded[:, :bits] = planes
    return torch.from_numpy(np.packbits(padded, axis=1, bitorder="little")[:, 0].astype(np.int64))


def dequantize_packed(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every packed weight of a packed file's `tensors` and `meta` as the float tensor the
    checkpoint would hold (its own layout and dtype)."""
    out = {}
    for name, info in meta.items():
        shape = tuple(info["shape"])
        rows, cols = (shape[1], shape[0]) if info["transposed"] else shape  # [out, in]
        index = unpack_bits(tensors[f"{name}.codes"], int(info["bits"]), rows * cols)
        values = tensors[f"{name}.table"].index_select(0, index)  # [out * in] in scale units
        group = int(info["group"])
        values = values.view(rows, -1, group)  # [out, n_groups, group]
        if f"{name}.zero" in tensors:
            values = values - tensors[f"{name}.zero"].reshape(rows, -1)[..., None]
        scale = tensors[f"{name}.scale"]
        values = values * (scale.reshape(1, 1, 1) if scale.numel() == 1 else scale.reshape(rows, -1)[..., None])
        weight = values.reshape(rows, cols)
        out[name] = (weight.T if info["transposed"] else weight).contiguous().to(getattr(torch, info["dtype"]))
    return out


def read_packed(folder: str | Path) -> dict[str, torch.Tensor]:
    """The float tensors of every packed weight in `folder` ({} if it has no packed file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / PACKED_FILE
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    if not meta:
        raise NoCheckpointError(f"{PACKED_FILE} in {Path(folder).name} has no {META_KEY!r} metadata, so its codes "
                                "cannot be read; export the model from LayerScope again.")
    return dequantize_packed(load_file(str(path)), meta)


def unpack_folder(folder: str | Path, into: str | Path) -> Path:
    """Write a plain float checkpoint folder `into` from the exported `folder`: every file
    copied, the packed weights dequantized back into model.safetensors. Returns `into`."""
    from safetensors.torch import load_file, save_file

    folder, into = Path(folder), Path(into)
    into.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.is_file() and path.name not in (PACKED_FILE, WEIGHTS_FILE):
            shutil.copy2(path, into / path.name)
    state = load_file(str(folder / WEIGHTS_FILE)) if (folder / WEIGHTS_FILE).is_file() else {}
    state.update(read_packed(folder))
    save_file(state, str(into / WEIGHTS_FILE), metadata={"format": "pt"})
    return into


def load_packed(folder: str | Path, **kwargs: Any) -> torch.nn.Module:
    """The exported `folder` as a transformers causal LM (weights in float): plain
    `from_pretrained` where the folder has no packed weights, else from a float copy
    written to a temporary folder by `unpack_folder`. kwargs go to `from_pretrained`."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / PACKED_FILE).is_file():
        return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).eval()
    with tempfile.TemporaryDirectory(prefix="layerscope-unpacked-") as tmp:
        return AutoModelForCausalLM.from_pretrained(str(unpack_folder(folder, tmp)), **kwargs).eval()
