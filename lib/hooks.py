"""Context managers that add hooks and always remove them, also when the body raises."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

HookFn = Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]


@contextmanager
def forward_hooks(pairs: Sequence[tuple[nn.Module, HookFn]]) -> Iterator[None]:
    """Register `module.register_forward_hook(fn)` for each pair; remove all on exit."""
    handles = []
    try:
        for module, fn in pairs:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record each named module's forward output (detached) into the yielded dict."""
    store: dict[str, torch.Tensor] = {}

    def make(name: str) -> HookFn:
        def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            store[name] = out.detach()
        return hook

    with forward_hooks([(m, make(n)) for n, m in modules.items()]):
        yield store


def count_hooks(model: nn.Module) -> int:
    """Total forward/backward/pre hooks on every submodule (0 means nothing leaked),
    counting TransformerLens HookPoint hooks too."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        total += len(getattr(m, "fwd_hooks", []) or []) + len(getattr(m, "bwd_hooks", []) or [])
    return total
