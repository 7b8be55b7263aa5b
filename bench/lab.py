"""Compression lab rows (issue 10 targets: apply + re-evaluate <= 2.5 forwards; the
latency of a copy with half its blocks removed within 10% of what a FLOP count predicts)."""

from __future__ import annotations

from typing import Callable

from analysis.compress.lab import Lab
from analysis.compress.prune.pruning import Drop, Magnitude
from analysis.compress.recipe import Recipe, build
from bench.common import Row, Setup, measure, ratio_text, tokens_text
from lib.handle import Structure


def forward_flops(s: Structure, blocks: int, seq_len: int) -> int:
    """FLOPs per token of a GPT-2-shaped forward with `blocks` blocks: each block 24 d^2
    (projections and MLP) + 4 T d (attention over T keys), the readout 2 d V."""
    return blocks * (24 * s.d_model**2 + 4 * seq_len * s.d_model) + 2 * s.d_model * s.d_vocab


def apply_row(setup: Setup) -> Row:
    """What one change in the lab costs: a fresh private copy, a 50% magnitude pass and one
    edited forward scored against base outputs prepared once (latency from that forward)."""
    handle, batch = setup.handle, setup.batch
    lab = Lab(handle, batch, latency_repeats=0)  # the edited forward's own time: one forward, as the row says
    edits = [Magnitude(0.5)]

    def apply_and_evaluate():
        lab.clear_cache()  # built again from the base every time
        lab.evaluate(edits)

    t = measure(apply_and_evaluate, lambda: handle.forward(batch.tokens), setup.repeats)
    return Row.timed("apply magnitude pruning + re-evaluate / forward", t,
                     f"copy + 50% magnitude on every block + 1 forward + metrics, {tokens_text(batch)} "
                     "(target <= 2.5)")


def half_blocks_row(setup: Setup) -> Row:
    """Latency of a copy with every other block really removed, over the full model."""
    handle, batch = setup.handle, setup.batch
    s = handle.structure
    edits = [Drop("block", layer) for layer in range(1, s.n_layers, 2)]
    kept = s.n_layers - s.n_layers // 2
    seq_len = batch.tokens.shape[1]
    predicted = forward_flops(s, kept, seq_len) / forward_flops(s, s.n_layers, seq_len)
    return latency_row("latency half blocks dropped / full", setup, edits, predicted,
                       f"{kept} of {s.n_layers} blocks kept", "within 10%")


def latency_row(name: str, setup: Setup, edits: list, predicted: float, what: str, target: str) -> Row:
    """Latency of the bench model with `edits` over the full model, measured first, then
    measured over the `predicted` ratio (a FLOP count)."""
    handle, batch = setup.handle, setup.batch
    edited = build(handle, Recipe(handle.fingerprint, edits))
    t = measure(lambda: edited.forward(batch.tokens), lambda: handle.forward(batch.tokens), setup.repeats)
    return Row.timed(name, t, f"{what}; FLOP prediction {predicted:.3f}; measured/predicted "
                              f"{ratio_text([r / predicted for r in t.ratios])} (target {target})")


ROWS: tuple[Callable[[Setup], Row], ...] = (apply_row, half_blocks_row)
