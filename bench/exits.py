"""Early-exit rows (issue bar: full threshold curves of all four criteria <= 1.3 x one plain
forward plus one vocabulary readout per layer, the physical minimum)."""

from __future__ import annotations

from typing import Callable

from analysis.compress import exits
from bench.common import Row, Setup, measure, tokens_text


def curves_row(setup: Setup) -> Row:
    """The one pass (every layer's state, one blocked readout per checked depth) and the
    curves of all four criteria at 100 thresholds each, against the forward plus L
    readouts of the same tokens."""
    handle, batch = setup.handle, setup.batch
    states, _ = handle.exit_states(batch.tokens)
    depths = [h.reshape(-1, h.shape[-1]) for h in states]  # L x [N, d]: h_0..h_{L-1}

    def curves():
        exits.exit_curves(exits.collect_exit_stats(handle, batch), n=100)

    def minimum():
        handle.forward(batch.tokens)
        for h in depths:
            handle.blocks.readout(h)

    t = measure(curves, minimum, setup.repeats)
    s = handle.structure
    return Row.timed("exit curves all criteria / (forward + L readouts)", t,
                     f"{tokens_text(batch)} x vocab {s.d_vocab}, {s.n_layers} layers, 4 criteria x 100 thresholds "
                     "(target <= 1.3)")


ROWS: tuple[Callable[[Setup], Row], ...] = (curves_row,)
