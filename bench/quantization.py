"""Quantization rows (issue 13 targets: INT4 g128 on every weight <= 1 forward; changing
a quantization step and re-evaluating <= 2.5 forwards; QuantEase's layer-output error
below round-to-nearest's, ratio < 1)."""

from __future__ import annotations

import itertools
import time
from typing import Callable

from analysis.compress.edits import apply_
from analysis.compress.lab import Lab
from analysis.compress.quant.calibration import compare_methods
from analysis.compress.quant.quantize import Quantize
from bench.common import Row, Setup, measure, tokens_text


def quantize_row(setup: Setup) -> Row:
    """Every block's linear weights to INT4 g128 in place on one private copy (each
    repetition re-quantizes it: the same work), over one plain forward."""
    handle, batch = setup.handle, setup.batch
    copy = handle.private_copy()
    n = sum(w.numel() for name, w in copy.linear_layers().items() if copy.place(name)[0] is not None)
    t = measure(lambda: apply_(copy, Quantize("int4")), lambda: handle.forward(batch.tokens), setup.repeats)
    return Row.timed("quantize int4 g128 all weights / forward", t,
                     f"{n / 1e6:.1f}M weights, codes + scales + zero points recorded; forward on "
                     f"{tokens_text(batch)} (target <= 1)")


def change_row(setup: Setup) -> Row:
    """The lab after the user changes a quantization step's format: a fresh copy of the base,
    the new format on every block, one edited forward scored against base outputs."""
    handle, batch = setup.handle, setup.batch
    lab = Lab(handle, batch, latency_repeats=0)  # the edited forward's own time: one forward
    formats = itertools.cycle(["nf4", "int4", "int8", "fp8-e4m3"])

    def change_and_evaluate():
        lab.clear_cache()  # the step is the recipe's only one: nothing before it to reuse
        lab.evaluate([Quantize(next(formats))])

    t = measure(change_and_evaluate, lambda: handle.forward(batch.tokens), setup.repeats)
    return Row.timed("quantization change + re-evaluate / forward", t,
                     f"copy + nf4/int4/int8/fp8 in turn on every block + 1 forward + metrics, {tokens_text(batch)} "
                     "(target <= 2.5)")


def quantease_row(setup: Setup) -> Row:
    """QuantEase against round-to-nearest, INT4 g128, on every MLP input layer with
    calibration inputs from the bench batch: the ratio of the mean relative layer-output
    errors (not a time)."""
    handle, batch = setup.handle, setup.batch
    names = [f"blocks.{layer}.mlp.in" for layer in range(handle.structure.n_layers)]
    start = time.perf_counter()
    result = compare_methods(handle, batch.tokens, "int4", names)
    seconds = time.perf_counter() - start
    ratios = tuple(q / r for q, r in zip(result.quantease, result.rtn))
    return Row("quantease / rtn layer error", (result.mean_quantease / result.mean_rtn,),
               f"mean error rtn {result.mean_rtn:.4f}, quantease {result.mean_quantease:.4f} over {len(names)} "
               f"MLP input layers (per layer {min(ratios):.3f}..{max(ratios):.3f}); calibration on "
               f"{tokens_text(batch)}; {seconds:.1f} s (target < 1)")


ROWS: tuple[Callable[[Setup], Row], ...] = (quantize_row, change_row, quantease_row)
