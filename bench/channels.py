"""Channels rows (issue 11 targets: composition scores Q+K+V of all writer/reader pairs
<= 3 forwards, head roles from one pattern-recording pass <= 1.3 forwards)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

from analysis.channels import circuits as channels
from analysis.channels import heads
from bench.common import Row, Setup, measure, tokens_text


def _seconds(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def composition_row(setup: Setup) -> Row:
    """Our Gram-form scores against a forward; TransformerLens' `all_composition_scores` for
    the same three modes timed once beside it (it is slow) and checked equal."""
    handle, batch = setup.handle, setup.batch
    extract, c = _seconds(lambda: channels.circuits(handle))  # weights only: once per model in the app
    t = measure(lambda: channels.composition_scores(c), lambda: handle.forward(batch.tokens), setup.repeats)
    ours = channels.composition_scores(c)
    reference = handle.heads.circuit_model()
    tl_time, tl_scores = _seconds(lambda: {m: reference.all_composition_scores(m).scores for m in channels.MODES})
    error = max(float((ours.scores[m] - tl_scores[m]).abs().max()) for m in channels.MODES)
    forward = statistics.median(t.reference)
    return Row.timed("composition scores Q+K+V / forward", t,
                     f"{c.n_layers * c.n_heads} heads, all pairs, 3 modes (target <= 3); TransformerLens "
                     f"all_composition_scores Q+K+V once: {tl_time:.1f} s = {tl_time / forward:.1f} forwards, "
                     f"max |difference| {error:.1e}; circuits from the weights (per layer: read, fold, Gram SVD) "
                     f"{extract:.1f} s once per model")


def roles_row(setup: Setup) -> Row:
    handle, batch = setup.handle, setup.batch
    s = handle.structure
    t = measure(lambda: heads.head_roles(handle, batch.tokens), lambda: handle.forward(batch.tokens), setup.repeats)
    return Row.timed("head roles / forward", t,
                     f"{s.n_layers * s.n_heads} heads x 4 scores + Hopfield k from one pass recording the patterns "
                     f"of {tokens_text(batch)} (target <= 1.3)")


ROWS: tuple[Callable[[Setup], Row], ...] = (composition_row, roles_row)
