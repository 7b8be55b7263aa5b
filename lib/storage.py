"""How a model's tensors are stored and identified: `StoredAs` (a quantized or removed
tensor's bits as stored), the fingerprint of a set of weights, and the helpers that
copy a model's tensors without pulling apart views of one storage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class StoredAs:
    """How one weight tensor is stored when it is not the plain float tensor in memory:
    `bits` in total (codes + scales + zero points for a quantized tensor, 0 for a
    removed one) and a short description ("int4 g128", "removed")."""

    bits: int
    format: str

    @property
    def removed(self) -> bool:
        return self.format == "removed"


def quantized_bits(numel: int, code_bits: int, n_groups: int, scale_bits: int = 16, zero_bits: int = 0) -> int:
    """Storage of a quantized tensor: a code per element plus a scale (and a zero point,
    for asymmetric formats) per group."""
    return numel * code_bits + n_groups * (scale_bits + zero_bits)


def weight_fingerprint(tensors: Iterator[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of every tensor, in name order.
    Equal fingerprints mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def shared_storage_memo(model: nn.Module) -> dict[int, torch.Tensor]:
    """Copies, made in advance, of the tensors that share storage with another tensor.

    `copy.deepcopy` clones each parameter on its own, so tensors that are views of one
    storage would come apart in the copy (TransformerLens splits GPT-2's fused qkv
    weight into q, k and v views; the fast path reads the fused one). Seeding the deep
    copy's memo with views of one cloned storage keeps them views.
    """
    groups: dict[int, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            groups.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    memo: dict[int, torch.Tensor] = {}
    for group in groups.values():
        if len(group) < 2:
            continue
        storage = group[0].untyped_storage().clone()
        for t in group:
            view = torch.empty(0, dtype=t.dtype).set_(storage, t.storage_offset(), t.shape, t.stride())
            memo[id(t)] = nn.Parameter(view, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else view
    return memo


def distinct_tensors(named: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for name, t in named:
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out
