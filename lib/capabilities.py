"""What only some views need of a model, as objects a handle gives out: `handle.blocks`
(blocks run one at a time and the readout: the logit lens, the drop sweep, early exits),
`handle.heads` (per-head weights: Channels) and `handle.gates` (a network with its
nonlinearities frozen: the Interpreter; `FrozenGates` for a language model,
`LinearRegions` for a ReLU network). A handle whose backend lacks one raises
CapabilityError when it is asked for, before any work or copy.

Each class here says what it gives; a backend's implementation (`lib.lm_capabilities`,
`lib.image_handle`) is built on its handle and reads only what that handle's class defines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from lib.points import Point


class Blocks(ABC):
    """A transformer's blocks one at a time and its readout."""

    @abstractmethod
    def run(self, layer: int, resid: torch.Tensor, drop: str | None = None) -> torch.Tensor:
        """Block `layer` alone: resid_pre [batch, pos, d_model] -> resid_post, so chaining
        every block and `readout` reproduces the forward. drop: "attention" | "mlp", that
        sublayer adds nothing. Hooks set with `handle.hooks(...)` do not fire here."""

    @abstractmethod
    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        """Final norm (recomputed on `resid`) and unembedding: [b, pos, d] -> [b, pos, vocab]."""

    @abstractmethod
    def final_norm(self, resid: torch.Tensor) -> torch.Tensor:
        """The final norm alone, recomputed on `resid`: [..., d] -> [..., d]."""

    @abstractmethod
    def unembedding(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(W_U [vocab, d], b_U [vocab] or None) when `readout(h)` is exactly
        `final_norm(h) @ W_U.T + b_U`, so callers may compute logits in vocabulary blocks;
        None for any other readout (e.g. soft-capped logits)."""


class Heads(ABC):
    """Each attention head: which are left, how they share key/value heads, their weights in circuit form."""

    @abstractmethod
    def left(self, layer: int) -> list[int]:
        """Original indices of the attention heads layer `layer` still has."""

    @abstractmethod
    def groups(self, layer: int) -> list[list[int]]:
        """The heads layer `layer` still has, grouped by the key/value head they share (one
        head per group without grouped-query attention): what can be removed together."""

    @abstractmethod
    def qkv_layout(self, layer: int) -> str | None:
        """How a fused query/key/value weight stacks its rows: "blocks" ([all q; all k; all
        v]), "per-head" ([q; k; v] of each head in turn); None without a fused projection."""

    @abstractmethod
    def circuits(self) -> dict[str, Any]:
        """Per-head factors of the OV and QK circuits with the norm folded in, detached
        float32, read a layer at a time: "layer": layer -> {"W_Q" [H, d_model, d_head], "W_K",
        "W_V" [H_kv, d_model, d_head] (a grouped-query model's key/value heads, not repeated),
        "W_O" [H, d_head, d_model]}; "n_layers", "n_heads", "d_model", "n_kv_heads",
        "positional" ("rotary", "standard", ...)."""

    @abstractmethod
    def circuit_model(self) -> Any:
        """A TransformerLens bridge in compatibility mode (norm gains folded in, writing
        weights centred) on a private copy: for checks against TransformerLens' own."""


class FrozenGates(ABC):
    """A language model made exactly linear in its input embeddings (METHODS.md §3)."""

    @abstractmethod
    def points(self) -> dict[str, list[Point]]:
        """Where the model is not linear in its input embeddings, grouped by how a detached
        linearisation freezes each ("scale", "pattern", "query_key", "gate_in",
        "gate_out", "gate_branch") and where the input enters ("inputs")."""

    @abstractmethod
    def unembedding_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the unembedding reads for `tokens` [batch, pos], with autograd on; hooks of
        an enclosing `handle.hooks(...)` fire (they feed the inputs and freeze the points)."""


class LinearRegions(ABC):
    """A piecewise-affine network frozen on one input's linear region."""

    @abstractmethod
    def nonlinearities(self) -> list[tuple[str, str]]:
        """(layer path, type name) of every layer `frozen_at` freezes, in forward order."""

    @abstractmethod
    def frozen_at(self, x0: torch.Tensor) -> AbstractContextManager[torch.Tensor]:
        """Context manager: every nonlinearity frozen at its state for x0 [1, C, H, W]; yields F(x0)."""

    @abstractmethod
    def differentiable_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The output for `inputs` with autograd on (use on a private copy)."""

    @abstractmethod
    def attribution_module(self) -> nn.Module:
        """A private copy's network as a torch module, for attribution methods that hook it."""
