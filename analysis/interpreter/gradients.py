"""Where the interpreters take gradients (METHODS.md §3): a private copy of the model in
float64, so the shared base model is never hooked for gradients and stays bit-identical;
and what both linearisations share (their error, a progress callback that shows nothing).
"""

from __future__ import annotations

import torch

from lib.errors import AnalysisError
from lib.handle import ModelHandle


class InterpreterError(AnalysisError):
    """The model or input cannot be linearised this way; the message says why."""


def working_copy(handle: ModelHandle, dtype: torch.dtype = torch.float64) -> ModelHandle:
    """A private copy in `dtype` to take gradients on. Only input gradients are needed,
    so its parameters do not require them (no weight gradients are ever computed)."""
    return handle.private_copy(dtype=dtype)


def gradient_model(handle: ModelHandle, dtype: torch.dtype) -> ModelHandle:
    """`handle` itself when it already is a private copy (the page passes a cached one),
    else a fresh working copy in `dtype`."""
    return handle if handle.base_fingerprint is not None else working_copy(handle, dtype)


def no_progress(fraction: float, message: str) -> None:
    """A progress callback that shows nothing."""
