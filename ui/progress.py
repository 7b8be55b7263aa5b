"""Long work under a progress bar, and results kept in the no-copy `ui.store.STORE`."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import streamlit as st
from streamlit.runtime.scriptrunner import add_script_run_ctx

from ui.store import STORE

T = TypeVar("T")
Progress = Callable[[float, str], None]
# The bar appears only once the work has run FIRST_DRAW_S (short work draws nothing, like
# st.spinner: no flash of a bar) and then redraws at most every PROGRESS_INTERVAL_S (each
# redraw is browser work on the CPUs the computation shares when both run on one machine).
FIRST_DRAW_S = 0.5
PROGRESS_INTERVAL_S = 1.0


@contextmanager
def progress_bar(label: str) -> Iterator[Progress]:
    """A progress bar where the page is now, drawn FIRST_DRAW_S after the work starts
    (with the latest progress reported) and gone on exit (also when the body raises);
    yields `update(fraction, message)`, which redraws it at most every PROGRESS_INTERVAL_S,
    with the time left estimated from the pace so far (`time_left`)."""
    slot = st.empty()
    lock = threading.Lock()
    began = time.perf_counter()
    state = {"latest": (0.0, label), "drawn_at": None, "open": True}

    def draw() -> None:  # from the script thread or, once, from the timer
        with lock:
            if state["open"]:
                fraction, text = state["latest"]
                slot.progress(min(1.0, max(0.0, fraction)), text=text)
                state["drawn_at"] = time.perf_counter()

    def update(fraction: float, message: str) -> None:
        state["latest"] = (fraction, f"{label}: {message}{time_left(fraction, time.perf_counter() - began)}")
        drawn_at = state["drawn_at"]
        if drawn_at is not None and time.perf_counter() - drawn_at >= PROGRESS_INTERVAL_S:
            draw()

    timer = threading.Timer(FIRST_DRAW_S, draw)
    add_script_run_ctx(timer)
    timer.start()
    try:
        yield update
    finally:
        timer.cancel()
        with lock:
            state["open"] = False
            if state["drawn_at"] is not None:
                slot.empty()


def time_left(fraction: float, elapsed: float) -> str:
    """" · about N s left" from the pace so far, once there is a pace to go by (at least
    5 % done and 2 s spent) and more than 5 s remain; else nothing."""
    if fraction < 0.05 or elapsed < 2 or fraction >= 1:
        return ""
    left = elapsed * (1 - fraction) / fraction
    if left <= 5:
        return ""
    return f" · about {left:.0f} s left" if left < 120 else f" · about {left / 60:.0f} min left"


def stored(key: tuple, compute: Callable[[Progress | None], T], label: str | None = None) -> T:
    """`STORE`'s value for `key`, or `compute(progress)`; with a `label`, under a progress
    bar (nothing is drawn when the value is already there)."""
    found = STORE.get(key)
    if found is not None:
        return found
    if label is None:
        value = compute(None)
    else:
        with progress_bar(label) as update:
            value = compute(update)
    STORE.put(key, value)
    return value
