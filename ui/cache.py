"""What every page reads about the loaded base model, computed once per model: its
evaluation batch and baseline metrics (`st.cache_data`, keyed by the model's fingerprint)
and its outputs on that batch (large: the no-copy `ui.store.STORE`).

Small results go through `st.cache_data`, which copies its value on every hit; large
tensors (base logits: 16 x 256 x 50257 floats is about 800 MB for gpt2), analyses that
report progress while they run and the parts of one view's analysis go through `STORE`.
"""

from __future__ import annotations

import streamlit as st

from lib import data
from lib.handle import ModelHandle
from lib.metrics import Metrics, evaluate, model_inputs
from lib.scoring import Logits
from lib.spread import Spread, position_scores, spread
from lib.verify import Verification, verify
from ui.store import STORE


@st.cache_data(show_spinner=False, max_entries=8)
def _eval_batch(_handle: ModelHandle, fingerprint: str) -> data.Batch:
    return data.default_batch(_handle)


def eval_batch(handle: ModelHandle) -> data.Batch:
    """The model's fixed evaluation batch (`lib.data.default_batch`), made once per model."""
    return _eval_batch(handle, handle.fingerprint)


@st.cache_data(show_spinner=False, max_entries=8)
def _baseline(_handle: ModelHandle, fingerprint: str) -> Metrics:
    return evaluate(_handle, eval_batch(_handle))


def baseline(handle: ModelHandle) -> Metrics:
    """Baseline metrics of the base model on its evaluation batch (its latency is
    `ui.model.base_latency`'s: a timing is not a fixed property of the model to cache
    forever)."""
    return _baseline(handle, handle.fingerprint)


def base_outputs(handle: ModelHandle) -> Logits:
    """The base model's outputs on its evaluation batch (kept once, never copied; a language
    model's large logits as its final hidden state, read out as they are scored)."""
    return STORE.get_or_compute(("base_outputs", handle.fingerprint),
                                lambda: handle.outputs(model_inputs(eval_batch(handle))))


@st.cache_data(show_spinner=False, max_entries=8)
def _verified(_handle: ModelHandle, fingerprint: str) -> Verification:
    return verify(_handle, model_inputs(eval_batch(_handle)))


def verified(handle: ModelHandle) -> Verification:
    """The load-time check that the hooked path gives the plain path's outputs (`lib.verify`)."""
    return _verified(handle, handle.fingerprint)


@st.cache_data(show_spinner=False, max_entries=8)
def _baseline_spread(_handle: ModelHandle, fingerprint: str) -> Spread:
    return spread(position_scores(base_outputs(_handle), eval_batch(_handle)))


def baseline_spread(handle: ModelHandle) -> Spread:
    """Bootstrap intervals of the baseline metrics (`lib.spread`), from the base outputs."""
    return _baseline_spread(handle, handle.fingerprint)
