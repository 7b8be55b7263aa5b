"""The Model page's parts: the base model's latency, measured on request, the size of the
evaluation batch, and what the model could not read of a prompt (also shown by the
Interpreter page)."""

from __future__ import annotations

import time

import streamlit as st

from lib import data
from lib.errors import DataError
from lib.handle import ModelHandle
from lib.latency import LATENCY_REPEATS, Timing, base_timing, pace
from lib.metrics import model_inputs
from lib.progress import Progress
from ui.cache import MAX_EVAL_WINDOWS, auto_windows, base_forward_seconds, batch_key, eval_batch, set_windows
from ui.progress import stored


def base_latency(handle: ModelHandle, attempt: int = 0) -> tuple[Timing, float]:
    """The base model's timed forwards over its evaluation batch, and when they were made
    (seconds since the epoch), under a bar with a Stop (`ui.progress.Stopped` until the
    visitor goes on). `attempt`: a new measurement each time the user asks."""
    def compute(progress: Progress) -> tuple[Timing, float]:
        inputs = model_inputs(eval_batch(handle))
        whole, untimed = base_forward_seconds(handle), 1 / (LATENCY_REPEATS + 1)  # a forward weighs about a timed one
        progress(0.0, "one untimed forward first")
        warm = whole is None  # else the base's forward gave its time, by another path: `forward` runs cold
        whole = pace(handle, inputs) if whole is None else whole
        timing = base_timing(handle, inputs, whole, progress=lambda f, m: progress(untimed + (1 - untimed) * f, m),
                             warm=warm)
        return timing, time.time()

    return stored(("base_latency", *batch_key(handle), attempt), compute, "Timing the model",
                  stop="Nothing of the timing is kept: going on times it again.")


def prompt_notes(result, n_ctx: int) -> None:
    """What the model could not read of a prompt (a `NextTokens`): pieces outside its
    vocabulary, and tokens dropped from the front to fit its context."""
    if result.unknown:
        st.warning("Not in this model's vocabulary, so fed as its unknown/BOS token: "
                   + ", ".join(f"“{piece}”" for piece in result.unknown))
    if result.truncated:
        st.info(f"The prompt is longer than the model's context of {n_ctx} tokens: the first {result.truncated} "
                "tokens were dropped, and the model reads the rest.")



def batch_control(handle: ModelHandle) -> None:
    """A language model's evaluation windows: sized from the model (parameters x tokens), and
    the visitor may raise them for narrower intervals, at the cost of every page's time."""
    batch = eval_batch(handle)
    if not isinstance(batch, data.TextBatch) or batch.answer_mask is not None:  # a fixed task set
        return
    auto, key = auto_windows(handle), f"eval_windows_{handle.fingerprint}"

    def changed() -> None:
        try:
            set_windows(handle, int(st.session_state[key]))
        except DataError as e:
            st.session_state["eval_windows_error"] = str(e)
            st.session_state[key] = len(batch.tokens)  # the box shows the batch in use

    st.session_state.setdefault(key, len(batch.tokens))  # the batch in use (the box's own state, once it has one)
    st.number_input("Evaluation windows", min_value=auto, max_value=MAX_EVAL_WINDOWS, step=1, key=key,
                    on_change=changed,
                    help=f"{auto} is sized from the model (parameters × tokens); more windows narrow every interval "
                         "and make every page's measurement take longer in proportion. Applies to this model on "
                         "every page; the lab re-measures your recipe on the new batch.")
    if "eval_windows_error" in st.session_state:
        st.error(st.session_state.pop("eval_windows_error"))
