"""Independent references for the family matrix: the checkpoint loaded again with plain
transformers (eager attention), and sublayers or heads cut by plain torch hooks on its
own modules. Nothing here goes through LayerScope's handle."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

_ATTENTION = ("self_attn", "attention", "attn")  # Llama-like, GPT-NeoX, GPT-2
_OUT_PROJ = ("o_proj", "dense", "out_proj", "c_proj")


def plain_model(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager", dtype=dtype)
    return model.eval()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    n = model.config.num_hidden_layers
    return next(m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n)


def attention(layer: nn.Module) -> nn.Module:
    return next(getattr(layer, a) for a in _ATTENTION if hasattr(layer, a))


def out_proj(layer: nn.Module) -> nn.Module:
    attn = attention(layer)
    return next(getattr(attn, a) for a in _OUT_PROJ if hasattr(attn, a))


def mlp(layer: nn.Module) -> nn.Module:
    """The module whose output is the MLP's write (OPT has no MLP module: its fc2)."""
    return layer.mlp if hasattr(layer, "mlp") else layer.fc2


def _zero_output(_module: nn.Module, _args: tuple, output: object) -> object:
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]),) + output[1:]
    return torch.zeros_like(output)


def _pass_through(_module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def cut(model: nn.Module, parts: Sequence[tuple[str, int]] = (), heads: Sequence[tuple[int, int]] = ()
        ) -> Iterator[None]:
    """Inside, each (kind, layer) part ("block", "attention", "mlp") adds nothing to the
    residual stream, and each (layer, head) head's output is zero (its slice of the output
    projection's input)."""
    layers = decoder_layers(model)
    handles = []
    for kind, l in parts:
        if kind == "block":
            handles.append(layers[l].register_forward_hook(_pass_through, with_kwargs=True))
        else:
            module = attention(layers[l]) if kind == "attention" else mlp(layers[l])
            handles.append(module.register_forward_hook(_zero_output))
    d_head = model.config.hidden_size // model.config.num_attention_heads
    d_head = getattr(model.config, "head_dim", None) or d_head
    for l, h in heads:
        def zero_head(_m: nn.Module, args: tuple, h: int = h) -> tuple:
            x = args[0].clone()
            x[..., h * d_head:(h + 1) * d_head] = 0
            return (x,) + args[1:]
        handles.append(out_proj(layers[l]).register_forward_pre_hook(zero_head))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def logits(model: nn.Module, tokens: torch.Tensor, parts: Sequence[tuple[str, int]] = (),
           heads: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
    with cut(model, parts, heads):
        return model(input_ids=tokens).logits
