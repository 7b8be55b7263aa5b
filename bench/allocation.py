"""Allocation rows (issue 15: rate-distortion curves reported against a forward; the
latency of every MLP weight factorised at half its break-even rank within 15% of what a
FLOP count predicts)."""

from __future__ import annotations

from typing import Callable

from analysis.compress.prune.allocation import distortion_curves
from analysis.compress.prune.factorize import LowRank, break_even_rank
from bench.common import Row, Setup, Timing, ratio_text
from bench.lab import forward_flops, latency_row
from lib.handle import Structure

LEVELS = 20


def curves_row(setup: Setup) -> Row:
    """All per-layer curves (every linear layer in the blocks, K = 20 levels) on one
    128-token window, as the lab computes them, over one forward of that window. One
    repetition is minutes, so the three repetitions run without a warm-up."""
    handle = setup.handle
    tokens = setup.batch.tokens[:1, :128]
    measured, reference, found = [], [], []
    for _ in range(setup.repeats):
        t = Timing.of(lambda: found.append(distortion_curves(handle, tokens, LEVELS)), lambda: handle.forward(tokens))
        measured.append(t.measured[0])
        reference.append(t.reference[0])
    t = Timing(tuple(measured), tuple(reference))
    n_layers = len(found[-1].layers)
    evaluations = n_layers * (LEVELS - 1)
    per = [r / evaluations for r in t.ratios]
    return Row.timed("rd distortion curves / forward", t,
                     f"{n_layers} layers x {LEVELS - 1} levels = {evaluations} pruned evaluations on 1x128 "
                     f"tokens (report); per evaluation {ratio_text(per)} forwards: each reruns only the blocks from "
                     "its layer on, plus the readout")


def _mlp_flops(s: Structure, rank: int, seq_len: int) -> int:
    """FLOPs per token with both MLP weights (d x 4d) factorised at `rank`."""
    full = forward_flops(s, s.n_layers, seq_len)
    mlp = 2 * 2 * s.d_model * s.d_mlp  # the two MLP matmuls of one block
    factorised = 2 * 2 * rank * (s.d_model + s.d_mlp)
    return full - s.n_layers * (mlp - factorised)


def low_rank_row(setup: Setup) -> Row:
    s = setup.handle.structure
    rank = int(break_even_rank(s.d_mlp, s.d_model) / 2)
    seq_len = setup.batch.tokens.shape[1]
    predicted = _mlp_flops(s, rank, seq_len) / forward_flops(s, s.n_layers, seq_len)
    return latency_row("low-rank latency / full", setup, [LowRank(rank=rank, scope="mlp")], predicted,
                       f"every MLP weight at rank {rank} (half its break-even rank)", "within 15%")


ROWS: tuple[Callable[[Setup], Row], ...] = (low_rank_row, curves_row)
