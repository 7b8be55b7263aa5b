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
def forward_pre_hooks(pairs: Sequence[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Register `module.register_forward_pre_hook(fn)` for each pair; remove all on exit."""
    handles = []
    try:
        for module, fn in pairs:
            handles.append(module.register_forward_pre_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def count_hooks(model: nn.Module) -> int:
    """Hooks a user (or our code) added and did not remove; 0 means nothing leaked.

    On a TransformerLens bridge only its HookPoints count: the bridge keeps a few
    internal torch hooks of its own (it adds them on its first `run_with_cache`).
    """
    hook_dict = getattr(model, "hook_dict", None)
    if isinstance(hook_dict, dict):  # legacy aliases name the same HookPoint twice
        modules = list({id(m): m for m in hook_dict.values()}.values())
    else:
        modules = list(model.modules())
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in modules)


TL_STASHED = ("_pattern", "_captured_pre_ln_residual")  # what TransformerLens keeps of its last forward


def forget_tl_stash(bridge: nn.Module) -> None:
    """Drop what a TransformerLens bridge keeps of its last forward (`TL_STASHED`: each
    layer's attention pattern, 540 MB in all for GPT-2 small at 15 x 256 tokens)."""
    for module in bridge.modules():
        for name in TL_STASHED:
            if isinstance(getattr(module, name, None), torch.Tensor):
                setattr(module, name, None)
