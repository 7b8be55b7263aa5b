"""How long work tells how far it got: a `Progress(fraction, message)` callback, and the part
of one bar that a stage of the work fills (`stage`)."""

from __future__ import annotations

from typing import Callable

Progress = Callable[[float, str], None]  # fraction done in [0, 1], what is being done now


def stage(progress: Progress | None, low: float, high: float, prefix: str = "") -> Progress | None:
    """`progress` for one stage of a step, which fills [low, high] of its bar: the stage's own
    fraction f is told as low + (high - low) f, its message after `prefix` (None stays None)."""
    if progress is None:
        return None
    return lambda f, m: progress(low + (high - low) * min(max(f, 0.0), 1.0), f"{prefix}{m}")
