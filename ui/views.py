"""Cached computations behind each view, keyed by model fingerprint and the
parameters each really depends on.

Small results go through `st.cache_data`; large tensors (base logits: 16 x 256 x
50257 floats is about 800 MB for gpt2), analyses that report progress while they run
and the parts of one view's analysis go through the no-copy `ui.store.STORE`.
"""

from __future__ import annotations

import time

import streamlit as st
import torch

from analysis.lens import LogitLens
from analysis.redundancy import report as rr
from analysis.redundancy.drops import DropSweep
from analysis.redundancy.report import DropCheck, RedundancyReport
from analysis.redundancy.similarity import LayerSimilarity, Residuals, StageSimilarity, stage_similarity
from lib import data
from lib.handle import ModelHandle
from lib.metrics import Metrics, Timing, base_timing, evaluate, model_inputs
from ui.progress import Progress, stored
from ui.store import STORE


@st.cache_data(show_spinner=False, max_entries=8)
def eval_batch(_handle: ModelHandle, fingerprint: str) -> data.Batch:
    return data.default_batch(_handle)


@st.cache_data(show_spinner=False, max_entries=8)
def baseline(_handle: ModelHandle, fingerprint: str) -> Metrics:
    """Baseline metrics of the base model on its evaluation batch (its latency is
    `base_latency`'s: a timing is not a fixed property of the model to cache forever)."""
    return evaluate(_handle, eval_batch(_handle, fingerprint))


def base_latency(handle: ModelHandle, attempt: int = 0) -> tuple[Timing, float]:
    """The base model's timed forwards over its evaluation batch, and when they were made
    (seconds since the epoch). `attempt`: a new measurement each time the user asks."""
    def compute() -> tuple[Timing, float]:
        inputs = model_inputs(eval_batch(handle, handle.fingerprint))
        start = time.perf_counter()
        handle.forward(inputs)  # untimed: it also builds what later forwards reuse
        return base_timing(handle, inputs, time.perf_counter() - start), time.time()

    return STORE.get_or_compute(("base_latency", handle.fingerprint, attempt), compute)


def base_outputs(handle: ModelHandle) -> torch.Tensor:
    """The base model's outputs on its evaluation batch (kept once, never copied)."""
    return STORE.get_or_compute(("base_outputs", handle.fingerprint),
                                lambda: handle.forward(model_inputs(eval_batch(handle, handle.fingerprint))))


# The Redundancy view in parts, each cached by what it depends on: the hooked pass and
# the drop sweep by the model alone, the statistics and the lens by model and skip.


def residuals(handle: ModelHandle) -> Residuals:
    """The hooked pass over the evaluation batch (every position, logits included)."""
    def compute(_: Progress | None) -> Residuals:
        with st.spinner("One forward pass with hooks ..."):
            return rr.residual_pass(handle, eval_batch(handle, handle.fingerprint))

    return stored(("residuals", handle.fingerprint), compute)


def layer_statistics(handle: ModelHandle, skip: int) -> LayerSimilarity:
    batch = eval_batch(handle, handle.fingerprint)
    return stored(("layer_statistics", handle.fingerprint, skip),
                   lambda _: rr.layer_statistics(handle, batch, residuals(handle), skip))


def lens(handle: ModelHandle, skip: int) -> LogitLens:
    batch = eval_batch(handle, handle.fingerprint)
    return stored(("lens", handle.fingerprint, skip),
                   lambda step: rr.lens_statistics(handle, batch, residuals(handle), skip, progress=step), "Logit lens")


def stage_statistics(handle: ModelHandle) -> StageSimilarity:
    return stored(("stage_statistics", handle.fingerprint),
                   lambda _: stage_similarity(handle, eval_batch(handle, handle.fingerprint)), "Comparing stages")


def drop_sweep(handle: ModelHandle) -> DropSweep:
    """Every single drop measured (LMs reuse the cached pass)."""
    batch = eval_batch(handle, handle.fingerprint)
    if rr.is_stage_model(handle, batch):
        return stored(("drop_sweep", handle.fingerprint), lambda _: rr.drop_sweep(handle, batch),
                       "Dropping each stage")
    return stored(("drop_sweep", handle.fingerprint),
                   lambda step: rr.drop_sweep(handle, batch, residuals(handle), progress=step), "Dropping each module")


def redundancy(handle: ModelHandle, skip: int) -> RedundancyReport:
    """The Redundancy view's report, assembled from the cached parts (any missing one is
    computed here; the page computes them one by one first, to draw each when ready)."""
    batch = eval_batch(handle, handle.fingerprint)
    if rr.is_stage_model(handle, batch):
        return rr.assemble(batch, drop_sweep(handle), stages=stage_statistics(handle))
    return rr.assemble(batch, drop_sweep(handle), similarity=layer_statistics(handle, skip), lens=lens(handle, skip))


def drop_check(handle: ModelHandle, skip: int, drops: tuple) -> DropCheck:
    """Predicted vs measured change for dropping `drops` together. An LM's base outputs
    are the logits of the cached pass (no second base forward)."""
    batch = eval_batch(handle, handle.fingerprint)

    def compute():
        with st.spinner("Dropping the parts together and re-measuring ..."):
            report = redundancy(handle, skip)
            base = base_outputs(handle) if rr.is_stage_model(handle, batch) else residuals(handle).logits
            return rr.check_drops(handle, batch, report, list(drops), base)

    return STORE.get_or_compute(("drop_check", handle.fingerprint, skip, drops), compute)


def prompt_notes(result, n_ctx: int) -> None:
    """What the model could not read of a prompt (a `NextTokens`): pieces outside its
    vocabulary, and tokens dropped from the front to fit its context."""
    if result.unknown:
        st.warning("Not in this model's vocabulary, so fed as its unknown/BOS token: "
                   + ", ".join(f"“{piece}”" for piece in result.unknown))
    if result.truncated:
        st.info(f"The prompt is longer than the model's context of {n_ctx} tokens: the first {result.truncated} "
                "tokens were dropped, and the model reads the rest.")

