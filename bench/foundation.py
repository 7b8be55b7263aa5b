"""Foundation rows: the cost of `evaluate` against a plain forward."""

from __future__ import annotations

from typing import Callable

from bench.common import Row, Setup, measure, tokens_text
from lib.metrics import evaluate


def evaluate_row(setup: Setup) -> Row:
    handle, batch = setup.handle, setup.batch
    t = measure(lambda: evaluate(handle, batch), lambda: handle.forward(batch.tokens), setup.repeats)
    return Row.timed("evaluate / plain forward", t, f"on {tokens_text(batch)}")


ROWS: tuple[Callable[[Setup], Row], ...] = (evaluate_row,)
