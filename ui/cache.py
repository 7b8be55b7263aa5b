"""What every page reads about the loaded base model, computed once per model and evaluation
batch: the batch itself (sized from the model, or raised by the visitor: `eval_windows`),
its outputs on that batch (large: the no-copy `ui.store.STORE`), and the baseline metrics
with their intervals, scored from them once under a bar (`STORE`, keyed by `batch_key`: the
model's fingerprint and the batch's digest).

Small results go through `st.cache_data`, which copies its value on every hit; large
tensors (base logits: 16 x 256 x 50257 floats is about 800 MB for gpt2), analyses that
report progress while they run and the parts of one view's analysis go through `STORE`.
"""

from __future__ import annotations

import time
from dataclasses import replace

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from analysis.redundancy.similarity import RedundancyError, outputs_with_residuals, residual_bytes
from lib import data
from lib.errors import DataError
from lib.handle import ModelHandle
from lib.metrics import Metrics, metrics_from_outputs, model_inputs
from lib.progress import Progress
from lib.scoring import BaseOutputs, Logits, ReadLogits, prepare_base, readout_blocks
from lib.spread import Spread, position_scores, spread
from lib.verify import Verification, verify
from ui.progress import counting_blocks, stored
from ui.store import STORE

MAX_EVAL_WINDOWS = 64  # windows a visitor may raise a language model's evaluation batch to
# The base forward also records the residual stream (2L+1 states of the batch) where that takes
# at most this: one pass then feeds the baseline and the Redundancy page (a sixteenth of the
# result store at its smallest, 4 GiB, which keeps it).
SHARED_PASS_BYTES = 256 << 20


@st.cache_data(show_spinner=False, max_entries=8)
def _eval_batch(_handle: ModelHandle, fingerprint: str, n_windows: int | None) -> data.Batch:
    return data.default_batch(_handle, n_windows)


def eval_windows(handle: ModelHandle) -> int | None:
    """The windows this visitor asked for on this model (None: sized from the model; always
    None outside a visitor's run, as for the warm-up)."""
    if get_script_run_ctx() is None:
        return None
    return st.session_state.get("eval_windows", {}).get(handle.fingerprint)


def eval_batch(handle: ModelHandle) -> data.Batch:
    """The model's evaluation batch (`lib.data.default_batch`, sized from the model, or with
    the windows this visitor raised it to), made once per model and size."""
    return _eval_batch(handle, handle.fingerprint, eval_windows(handle))


def auto_windows(handle: ModelHandle) -> int:
    """Windows of the evaluation batch sized from the model (`lib.data.default_batch`)."""
    return len(model_inputs(_eval_batch(handle, handle.fingerprint, None)))


def set_windows(handle: ModelHandle, n_windows: int) -> None:
    """This visitor's evaluation batch for this model: `n_windows` windows (the size chosen
    from the model, or more, up to MAX_EVAL_WINDOWS). DataError when the held-out text has
    fewer windows to give; the batch is then unchanged."""
    auto = auto_windows(handle)
    if not auto <= n_windows <= MAX_EVAL_WINDOWS:
        raise DataError(f"The evaluation batch takes {auto} to {MAX_EVAL_WINDOWS} windows on this model "
                        f"({auto}: sized from the model), not {n_windows}.")
    if n_windows != auto:
        _eval_batch(handle, handle.fingerprint, n_windows)  # too little text: refused here, not on every page
    st.session_state.setdefault("eval_windows", {})[handle.fingerprint] = None if n_windows == auto else n_windows


def batch_key(handle: ModelHandle) -> tuple[str, str]:
    """What a result computed on the evaluation batch is cached under: the model and the batch
    (a visitor who raised the batch gets results of their own)."""
    return handle.fingerprint, eval_batch(handle).digest


def scored_baseline(handle: ModelHandle, stop: bool = False) -> tuple[Metrics, Spread]:
    """Baseline metrics of the base model on its evaluation batch and their bootstrap
    intervals (`lib.spread`), from one scoring of its outputs under a bar (a language model's
    readout is the work of several blocks per position); with `stop`, one with a Stop
    (`Stopped` from then on for this visitor, until they go on). The outputs come first,
    under their own bar."""
    def compute(progress: Progress | None) -> tuple[Metrics, Spread]:
        outputs, batch, per_row, key = base_outputs(handle), eval_batch(handle), {}, _prepared_key(handle)
        with counting_blocks(handle, progress, forwards=0, scorings=1):  # the one readout: every lab reads it too
            prepared = STORE.get(key)
            if prepared is None:
                prepared = prepare_base(outputs, batch)
                STORE.put(key, prepared)
            metrics = metrics_from_outputs(outputs, batch, handle.n_params, handle.size_bits, prepared, per_row=per_row)
        metrics = replace(metrics, kl_to_base=None, agreement=None)  # against itself: nothing to show
        return metrics, spread(position_scores(outputs, batch, None, per_row))  # the same pass's scores

    return stored(("base_scored", *batch_key(handle)), compute, "Scoring the model on its evaluation set",
                  stop="Nothing of the scoring is kept: going on scores it again." if stop else None,
                  after=lambda: base_outputs(handle, stop=stop))


def baseline(handle: ModelHandle) -> Metrics:
    """Baseline metrics of the base model on its evaluation batch (its latency is
    `ui.model.base_latency`'s: a timing is not a fixed property of the model to cache
    forever)."""
    return scored_baseline(handle)[0]


def base_outputs(handle: ModelHandle, stop: bool = False) -> Logits:
    """The base model's outputs on its evaluation batch (kept once, never copied; a language
    model's large logits as its final hidden state, read out as they are scored), computed
    under a bar that counts the forward's blocks; with `stop`, one with a Stop (`stored`:
    `Stopped` from then on for this visitor, until they go on). How long a forward takes is
    kept beside them (`base_forward_seconds`)."""
    def compute(progress: Progress | None) -> Logits:
        with counting_blocks(handle, progress):  # the handle's lock is taken here: a wait for it is not timed
            start = time.perf_counter()
            outputs = _outputs(handle, eval_batch(handle))
            seconds = time.perf_counter() - start
        if isinstance(outputs, ReadLogits):  # its readout, left for the scoring, is part of a forward
            seconds *= 1 + readout_blocks(handle) / handle.structure.n_layers
        STORE.put(("base_forward_seconds", *batch_key(handle)), seconds)
        return outputs

    return stored(("base_outputs", *batch_key(handle)), compute, "Running the model on its evaluation set",
                  stop="Nothing of the run is kept: going on runs it again." if stop else None)


def _outputs(handle: ModelHandle, batch: data.Batch) -> Logits:
    """The model's outputs on `batch`; a language model's residual stream recorded by the same
    forward where it takes at most SHARED_PASS_BYTES, kept for the Redundancy page
    (`residuals_key`): that page then runs no pass of its own."""
    if handle.kind == "causal-lm" and isinstance(batch, data.TextBatch) and STORE.get(residuals_key(handle)) is None \
            and residual_bytes(handle, batch) <= SHARED_PASS_BYTES:
        try:
            got = outputs_with_residuals(handle, batch)
        except RedundancyError:  # windows too short to compare depths: the outputs alone
            got = None
        if got is not None:
            outputs, residuals = got
            if residuals is not None:
                STORE.put(residuals_key(handle), residuals)
            return outputs
    return handle.outputs(model_inputs(batch))


def residuals_key(handle: ModelHandle) -> tuple:
    """Where the residual pass over the evaluation batch is kept (`ui.redundancy.residuals`)."""
    return ("residuals", *batch_key(handle))


def base_forward_seconds(handle: ModelHandle) -> float | None:
    """Seconds a forward of the evaluation batch takes, from the one behind `base_outputs` in
    this process (None before it ran): how the timing is sized without a forward of its own
    to pace it (`lib.latency.timed_part`)."""
    return STORE.get(("base_forward_seconds", *batch_key(handle)))


def prepared_base(handle: ModelHandle) -> BaseOutputs | Logits:
    """The base outputs prepared for comparisons (`lib.scoring.prepare_base`: the outputs by
    reference, plus a few numbers per position), once per model and batch, under a bar: every
    lab and every cut of a channel reads the same."""
    def compute(progress: Progress | None) -> BaseOutputs | Logits:
        with counting_blocks(handle, progress, forwards=0, scorings=1):
            return prepare_base(base_outputs(handle), eval_batch(handle))

    return stored(_prepared_key(handle), compute, "Preparing the base model's outputs for comparisons",
                  after=lambda: base_outputs(handle))


def _prepared_key(handle: ModelHandle) -> tuple:
    return ("base_prepared", *batch_key(handle))


@st.cache_data(show_spinner=False, max_entries=8)
def _verified(_handle: ModelHandle, fingerprint: str) -> Verification:
    return verify(_handle, model_inputs(_eval_batch(_handle, fingerprint, None)))  # on the batch sized from the model


def verified(handle: ModelHandle) -> Verification:
    """The load-time check that the hooked path gives the plain path's outputs (`lib.verify`)."""
    return _verified(handle, handle.fingerprint)


def baseline_spread(handle: ModelHandle) -> Spread:
    """Bootstrap intervals of the baseline metrics (`lib.spread`), from the base outputs."""
    return scored_baseline(handle)[1]
