"""The Model page's parts: the base model's latency, measured on request, and what the
model could not read of a prompt (also shown by the Interpreter page)."""

from __future__ import annotations

import time

import streamlit as st

from lib.handle import ModelHandle
from lib.metrics import Timing, base_timing, model_inputs
from ui.cache import eval_batch
from ui.store import STORE


def base_latency(handle: ModelHandle, attempt: int = 0) -> tuple[Timing, float]:
    """The base model's timed forwards over its evaluation batch, and when they were made
    (seconds since the epoch). `attempt`: a new measurement each time the user asks."""
    def compute() -> tuple[Timing, float]:
        inputs = model_inputs(eval_batch(handle))
        start = time.perf_counter()
        handle.forward(inputs)  # untimed: it also builds what later forwards reuse
        return base_timing(handle, inputs, time.perf_counter() - start), time.time()

    return STORE.get_or_compute(("base_latency", handle.fingerprint, attempt), compute)


def prompt_notes(result, n_ctx: int) -> None:
    """What the model could not read of a prompt (a `NextTokens`): pieces outside its
    vocabulary, and tokens dropped from the front to fit its context."""
    if result.unknown:
        st.warning("Not in this model's vocabulary, so fed as its unknown/BOS token: "
                   + ", ".join(f"“{piece}”" for piece in result.unknown))
    if result.truncated:
        st.info(f"The prompt is longer than the model's context of {n_ctx} tokens: the first {result.truncated} "
                "tokens were dropped, and the model reads the rest.")

