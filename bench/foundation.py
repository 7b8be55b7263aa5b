"""Foundation rows: the cost of `evaluate` against a plain forward."""

from __future__ import annotations

from bench.common import Row, timed_pair
from lib.metrics import evaluate


def rows(handle, batch) -> list[Row]:
    t_eval, t_fwd = timed_pair(lambda: evaluate(handle, batch), lambda: handle.forward(batch.tokens))
    return [Row("evaluate / plain forward", t_eval / t_fwd,
                f"{t_eval * 1000:.0f} ms vs {t_fwd * 1000:.0f} ms on {tuple(batch.tokens.shape)} tokens")]
