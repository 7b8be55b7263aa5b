"""Linear layers that edits put in place of a model's own: a low-rank factorisation,
and a layer that shares another layer's weight plus a low-rank delta.

Both keep what the layer they replace computes in its own convention (`nn.Linear`:
x W^T + b with W [out, in]; GPT-2's `Conv1D`: x W + b with W [in, out]) and can give
back a dense weight in that layout, so an edited model can be written as the
checkpoint's own architecture.
"""

from __future__ import annotations

import torch
from torch import nn


def _dense_layout(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """[out, in] -> the replaced layer's own layout ([in, out] for Conv1D)."""
    return weight.T.contiguous() if transposed else weight


class LowRankLinear(nn.Module):
    """W [out, in] ~ B A with A [rank, in], B [out, rank]: two linear maps, so the layer
    costs rank * (in + out) instead of in * out multiply-adds per token."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> None:
        super().__init__()
        self.a = nn.Parameter(a.contiguous(), requires_grad=False)  # [rank, in]
        self.b = nn.Parameter(b.contiguous(), requires_grad=False)  # [out, rank]
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        self.transposed = transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.a), self.b, self.bias)

    def dense(self) -> dict[str, torch.Tensor]:
        out = {"weight": _dense_layout(self.b @ self.a, self.transposed)}
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out


class SharedLinear(nn.Module):
    """W_j = W_i + B A: the weight of another layer (the same tensor, stored once) plus a
    rank-r delta (none for r = 0, pure sharing)."""

    def __init__(self, shared: nn.Parameter, a: torch.Tensor | None, b: torch.Tensor | None,
                 bias: torch.Tensor | None, transposed: bool, shared_transposed: bool) -> None:
        super().__init__()
        self.shared = shared  # the source layer's own parameter: counted once in the size
        self.a = None if a is None else nn.Parameter(a.contiguous(), requires_grad=False)  # [rank, in]
        self.b = None if b is None else nn.Parameter(b.contiguous(), requires_grad=False)  # [out, rank]
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        self.transposed, self.shared_transposed = transposed, shared_transposed

    def weight_out_in(self) -> torch.Tensor:
        return self.shared.T if self.shared_transposed else self.shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight_out_in(), self.bias)
        if self.a is not None:
            y = y + nn.functional.linear(nn.functional.linear(x, self.a), self.b)
        return y

    def dense(self) -> dict[str, torch.Tensor]:
        weight = self.weight_out_in()
        if self.a is not None:
            weight = weight + self.b @ self.a
        out = {"weight": _dense_layout(weight.detach(), self.transposed)}
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out
