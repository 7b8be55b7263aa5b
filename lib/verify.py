"""Are the numbers the model's own? One forward through the hooked path that records
activations (a language model's TransformerLens bridge; an image model's torch hooks)
and one through the plain path every metric uses (the checkpoint's own transformers
model; the torch module itself), on the same inputs, compared. Hooking libraries have
silently changed outputs before (a missing rotary embedding, a mask, a folded norm):
this puts the measured difference on the screen, at load.

    v = verify(handle, inputs); v.ok, v.max_abs_diff, v.text()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lib.handle import ModelHandle, Point

# A difference in float32 of at most this share of the outputs' own scale is rounding
# (SDPA and an explicit softmax differ by ~1e-7 relative). Half precision rounds far coarser,
# and more with depth and width: on the random-weight Llama-3.2-1B shape in bfloat16 (16
# layers, vocabulary 128k, 64 tokens) the plain path is 2.5 % of the scale from float32, and
# the hooked path is as far from both (hooked vs plain: 0.117 of 4.65; in float32 they agree
# to 9e-6); at width 512, 32 layers: 1.9 % in bfloat16, 0.22 % in float16. The bounds are
# about 2.4x the largest of these, float16's 8x finer (its mantissa has 3 more bits).
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 6e-2, torch.float16: 7.5e-3}
# Positions of one evaluation window the check reads: a path that drops the rotary embedding or
# the mask differs from the second position on. Its two forwards cost as many positions of the
# whole model: on the Llama-1B shape in bf16 on two CPU cores 3.8 s for 16 (15.1 s for 64).
VERIFY_TOKENS = 16
VERIFY_IMAGES = 8


@dataclass(frozen=True)
class Verification:
    """max_abs_diff: max |hooked - plain| over the outputs; scale: max |plain output|
    (at least 1); tolerance: the largest difference that is rounding for the model's dtype
    (RELATIVE_TOLERANCE x scale); paths: what was compared."""

    max_abs_diff: float
    scale: float
    tolerance: float
    paths: str

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def text(self) -> str:
        if self.ok:
            return f"verified: outputs match to {self.max_abs_diff:.1e} ({self.paths})"
        return (f"outputs differ by {self.max_abs_diff:.2g} (of outputs up to {self.scale:.3g}; rounding would be "
                f"under {self.tolerance:.1e}) between {self.paths}: recorded activations may not be this model's own")


def check_inputs(handle: ModelHandle, inputs: torch.Tensor) -> torch.Tensor:
    """The part of an evaluation input the check reads: one window's first tokens, or a few images."""
    return inputs[:1, :VERIFY_TOKENS] if handle.kind == "causal-lm" else inputs[:VERIFY_IMAGES]


@torch.no_grad()
def verify(handle: ModelHandle, inputs: torch.Tensor) -> Verification:
    """Compare the hooked forward (a no-op hook on the first block's input, which sends a
    language model through its bridge) with the plain one on `check_inputs(inputs)`."""
    x = check_inputs(handle, inputs)
    plain = handle.forward(x).float()
    first = Point("resid_pre", 0) if handle.kind == "causal-lm" else Point("stage", handle.structure.stages[0][0])
    with handle.hooks([(first, lambda tensor: None)]):
        hooked = handle.forward(x).float()
    scale = max(1.0, float(plain.abs().max()))
    diff = float((hooked - plain).abs().max())
    paths = ("TransformerLens' hooked forward vs plain transformers" if handle.kind == "causal-lm"
             else "hooked forward vs the torch module")
    return Verification(diff, scale, RELATIVE_TOLERANCE.get(handle.dtype, 1e-5) * scale, paths)
