"""Cached computations behind each view, keyed by model fingerprint and the
parameters each really depends on.

Small results go through `st.cache_data`; large tensors (base logits: 16 x 256 x
50257 floats is about 800 MB for gpt2) and analyses that report progress while they
run go through the no-copy `ui.store.STORE`.
"""

from __future__ import annotations

from typing import Callable

import streamlit as st
import torch

from lib import data
from lib.handle import ModelHandle
from lib.metrics import Metrics, evaluate, model_inputs
from ui.store import STORE


@st.cache_data(show_spinner=False, max_entries=8)
def eval_batch(_handle: ModelHandle, fingerprint: str) -> data.Batch:
    return data.default_batch(_handle)


@st.cache_data(show_spinner=False, max_entries=8)
def baseline(_handle: ModelHandle, fingerprint: str) -> Metrics:
    """Baseline metrics of the base model on its evaluation batch."""
    return evaluate(_handle, eval_batch(_handle, fingerprint))


def base_outputs(handle: ModelHandle) -> torch.Tensor:
    """The base model's outputs on its evaluation batch (kept once, never copied)."""
    return STORE.get_or_compute(("base_outputs", handle.fingerprint),
                                lambda: handle.forward(model_inputs(eval_batch(handle, handle.fingerprint))))


def redundancy(handle: ModelHandle, skip: int, progress: Callable[[float, str], None] | None = None):
    """The Redundancy view's report (one pass + lens + drop sweep), cached per model
    fingerprint and skip; `progress(fraction, message)` is called while computing."""
    from analysis.redundancy_report import build_report

    return STORE.get_or_compute(
        ("redundancy", handle.fingerprint, skip),
        lambda: build_report(handle, eval_batch(handle, handle.fingerprint), skip, progress=progress))


def drop_check(handle: ModelHandle, skip: int, drops: tuple):
    """Predicted vs measured change for dropping `drops` together."""
    from analysis.redundancy_report import check_drops

    def compute():
        with st.spinner("Dropping the parts together and re-measuring ..."):
            report = redundancy(handle, skip)
            return check_drops(handle, eval_batch(handle, handle.fingerprint), report, list(drops),
                               base_outputs(handle))

    return STORE.get_or_compute(("drop_check", handle.fingerprint, skip, drops), compute)


def with_progress(label: str):
    """A progress bar and a callback `(fraction, message)` that moves it."""
    bar = st.progress(0.0, text=label)

    def update(fraction: float, message: str) -> None:
        bar.progress(min(1.0, max(0.0, fraction)), text=f"{label}: {message}")

    return bar, update
