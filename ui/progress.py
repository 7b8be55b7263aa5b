"""Long work under a progress bar, and results kept in the no-copy `ui.store.STORE`."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import streamlit as st

from ui.store import STORE

T = TypeVar("T")
Progress = Callable[[float, str], None]
PROGRESS_INTERVAL_S = 0.25  # at most a few redraws a second: each is browser work on the CPUs the work needs


@contextmanager
def progress_bar(label: str) -> Iterator[Progress]:
    """A progress bar drawn where the page is now, gone on exit (also when the body raises);
    yields `update(fraction, message)`, which redraws it at most every PROGRESS_INTERVAL_S."""
    bar = st.progress(0.0, text=label)
    shown = [0.0]

    def update(fraction: float, message: str) -> None:
        now = time.perf_counter()
        if now - shown[0] >= PROGRESS_INTERVAL_S or fraction >= 1:
            shown[0] = now
            bar.progress(min(1.0, max(0.0, fraction)), text=f"{label}: {message}")

    try:
        yield update
    finally:
        bar.empty()


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
