"""Where a model runs and in what precision: `load_model(spec, device=..., dtype=...)`.

device "auto" picks CUDA, then Apple MPS, then the CPU; dtype "auto" keeps the
checkpoint's own (a bfloat16 checkpoint stays bfloat16; float32 when it does not say).
A language model larger than the free memory of one GPU is spread over what accelerate
finds (`device_map="auto"`, the ecosystem's own way). Statistics, metrics and the
interpreter accumulate in float32 / float64 whatever the weights are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lib import preflight
from lib.errors import ModelLoadError, ModelTooLargeError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES: dict[str, torch.dtype | None] = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                                         "float16": torch.float16}
_CONFIG_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """device: "cpu" | "cuda" | "mps" (the first device when spread); dtype: the weights';
    device_map: "auto" when the model is spread over devices by accelerate, else None."""

    device: str
    dtype: torch.dtype
    device_map: str | None = None


def available(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    return device == "cpu"


def pick_device(device: str) -> str:
    """The device `device` names ("auto": CUDA, then MPS, then CPU); one this machine
    does not have is refused in words."""
    if device not in DEVICES:
        raise ModelLoadError(f"A device is one of {', '.join(DEVICES)}, not {device!r}.")
    if device == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if available(d))
    if not available(device):
        raise ModelLoadError(f"This machine has no {device.upper()} device (torch sees none); load on the CPU "
                             "or pick device 'auto'.")
    return device


def checkpoint_dtype(config: dict) -> torch.dtype:
    """The precision config.json says the weights were saved in (float32 if it does not say)."""
    name = config.get("dtype") or config.get("torch_dtype")
    return _CONFIG_DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def pick_dtype(dtype: str, config: dict) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelLoadError(f"A precision is one of {', '.join(DTYPES)}, not {dtype!r}.")
    return DTYPES[dtype] or checkpoint_dtype(config)


def placement(device: str, dtype: str, config: dict, model_bytes: int = 0) -> Placement:
    """Where and how to load a model of `model_bytes` (in the chosen dtype)."""
    where, precision = pick_device(device), pick_dtype(dtype, config)
    if precision == torch.bfloat16 and where == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        precision = torch.float16
    spread = where == "cuda" and model_bytes > 0.9 * torch.cuda.mem_get_info()[0]
    return Placement(where, precision, "auto" if spread else None)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_copy(n_bytes: int, available_bytes: int | None = None) -> None:
    """Refuse a private copy of `n_bytes` (the lab's edited models, the interpreter's float64
    copy) that would take more than RAM_FRACTION of the memory free now (as a load may)."""
    import psutil

    free = psutil.virtual_memory().available if available_bytes is None else available_bytes
    if n_bytes > preflight.RAM_FRACTION * free:
        raise ModelTooLargeError(f"A private copy of this model (for an edit, or the interpreter's float64 "
                                 f"gradients) needs {n_bytes / 2**30:.2f} GiB, but only {free / 2**30:.2f} GiB of "
                                 "memory is free. Close other labs or sessions, or use a smaller model.")
