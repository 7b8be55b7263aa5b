"""How long work tells how far it got: a `Progress(fraction, message)` callback, the part
of one bar that a stage of the work fills (`stage`), and the bar a thread's deep work tells
(`telling`, `told_here`)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

Progress = Callable[[float, str], None]  # fraction done in [0, 1], what is being done now


def stage(progress: Progress | None, low: float, high: float, prefix: str = "") -> Progress | None:
    """`progress` for one stage of a step, which fills [low, high] of its bar: the stage's own
    fraction f is told as low + (high - low) f, its message after `prefix` (None stays None)."""
    if progress is None:
        return None
    return lambda f, m: progress(low + (high - low) * min(max(f, 0.0), 1.0), f"{prefix}{m}")


_HERE = threading.local()  # `progress`: the bar that work deep in this thread's call tells (`telling`)


@contextmanager
def set_in_thread(local: threading.local, name: str, value: object) -> Iterator[None]:
    """Inside, `local.<name>` is `value` in this thread; what it was comes back on exit (the
    thread-local switches of the bars: `telling`, `lib.scoring.told_of_windows`, ...)."""
    before = getattr(local, name, None)
    setattr(local, name, value)
    try:
        yield
    finally:
        setattr(local, name, before)


def telling(progress: Progress | None):
    """Inside, `told_here()` is `progress` in this thread: work deep in a call (an edit's
    calibration forwards) moves the bar its caller drew without a parameter through every
    function between."""
    return set_in_thread(_HERE, "progress", progress)


def told_here() -> Progress | None:
    """The progress this thread's caller is telling (`telling`), or None."""
    return getattr(_HERE, "progress", None)
