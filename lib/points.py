"""The names of a model's places, shared by the handle and its capabilities: activation
`Point`s, droppable `Part`s and the layer `Structure` (re-exported by `lib.handle`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

KINDS = ("causal-lm", "image-classifier", "image-to-image")
LM_PARTS = ("block", "attention", "mlp")

# An activation hook: gets the activation, returns a replacement or None (keep it).
# Told (points caught so far, points wanted) as a recording catches each point: a long
# recording's progress, and where it can be stopped (an exception raised here ends the forward)
Caught = Callable[[int, int], None]
ActivationHook = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class Point:
    """A named activation point.

    site: LMs "resid_pre" (x_l, entering block l) | "resid_mid" (m_l = x_l + attention's
    write; in a parallel block too, where nothing reads it) |
    "resid_post" (y_l) | "attn_out" | "mlp_out" | "pattern" (attention pattern
    [batch, head, query, key]) | "z" (each head's output before the output projection,
    [batch, pos, head, d_head]); image models "stage" (a stage's output).
    layer: block index (LMs) or stage name (image models).
    """

    site: str
    layer: int | str


class Part(Protocol):
    """A droppable part: kind "block" | "attention" | "mlp" (layer index) or "stage"
    (stage name). `analysis.pruning.Drop` is one."""

    kind: str
    layer: int | str


@dataclass(frozen=True)
class Structure:
    """Layer structure. For LMs the transformer shape; for image models the stages.

    stages: for image models, (name, description) per stage in forward order.
    removed: labels of parts removed from this (edited) copy, e.g. "attention 3".
    parallel: attention and MLP of a block both read the block's input and their writes
    are added together (GPT-NeoX, Phi, GPT-J), METHODS.md §1 "Parallel blocks".
    """

    architecture: str
    n_layers: int
    n_heads: int = 0
    d_model: int = 0
    d_head: int = 0
    d_mlp: int = 0
    d_vocab: int = 0
    n_ctx: int = 0
    stages: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    removed: tuple[str, ...] = ()
    parallel: bool = False
