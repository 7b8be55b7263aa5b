"""Interpreter rows (issue 12 targets: all classes of zoo:digits-cnn <= 30 forwards of the
image; the transformer linearisation of one 128-token sequence <= 4 forwards of it).

Both run the way the page does, on a private working copy made once (the page keeps it),
so the rows time the interpreter, not the copy; the rows use a float32 copy, in the
reference forward's precision, and give the float64 copy the page uses in their detail.
The bench runs with gradients globally off (`bench.__main__`); the interpreter turns them
on where it needs them.
"""

from __future__ import annotations

from typing import Callable

import torch

from analysis.interpreter import gradients, relu
from analysis.interpreter import transformer as it
from bench.common import Row, Setup, measure, ratio_text
from lib import data
from lib.models import load_model

CALLS = 20  # a forward of one 8x8 image takes well under a millisecond: time 20 of each so scheduler noise averages out


def all_classes_row(setup: Setup) -> Row:
    handle = load_model("zoo:digits-cnn")
    image = data.default_batch(handle).images[0]  # [1, 8, 8]
    copies = {dtype: gradients.working_copy(handle, dtype) for dtype in (torch.float64, torch.float32)}

    def interpreter(dtype: torch.dtype) -> Callable[[], object]:
        def run() -> object:
            for _ in range(CALLS):
                linear = relu.linear_map(copies[dtype], image)  # A, b, reconstruction, SVD
                votes = torch.stack([linear.votes(c) for c in range(linear.n_outputs)])  # every class's vote map
            return votes
        return run

    def forward() -> object:
        for _ in range(CALLS):
            out = handle.forward(image.unsqueeze(0))
        return out

    t = measure(interpreter(torch.float32), forward, setup.repeats)
    wide = measure(interpreter(torch.float64), forward, setup.repeats)
    return Row.timed("interpreter all classes / forward", t,
                     f"zoo:digits-cnn, 10 classes x 64 pixels, one image, {CALLS} calls per repetition, float32 "
                     f"copy like the forward (target <= 30); float64 copy (the page's): {ratio_text(wide.ratios)}")


def linearisation_row(setup: Setup) -> Row:
    handle = setup.handle
    tokens = setup.batch.tokens[:1, :128]  # one 128-token sequence
    target = it.logit_target(handle, int(tokens[0, -1]))
    copies = {torch.float32: gradients.working_copy(handle, torch.float32)}
    forward = lambda: handle.forward(tokens)  # noqa: E731
    t = measure(lambda: it.token_contributions(copies[torch.float32], tokens, target), forward, setup.repeats)
    result = it.token_contributions(copies[torch.float32], tokens, target)
    copies[torch.float64] = gradients.working_copy(handle, torch.float64)
    wide = measure(lambda: it.token_contributions(copies[torch.float64], tokens, target), forward, setup.repeats)
    error = it.token_contributions(copies[torch.float64], tokens, target).error
    s = handle.structure
    return Row.timed("transformer linearisation / forward", t,
                     f"{s.n_layers} layers, d {s.d_model}, 1x{tokens.shape[1]} tokens, one logit, float32 copy "
                     f"(target <= 4; error {result.error:.1g}); float64 copy: {ratio_text(wide.ratios)} "
                     f"(error {error:.1g})")


ROWS: tuple[Callable[[Setup], Row], ...] = (all_classes_row, linearisation_row)
