"""Foundation rows: the cost of `evaluate` against a plain forward, and the handle's
forward against Hugging Face's own (issue bar: <= 1.05)."""

from __future__ import annotations

from typing import Callable

from bench.common import Row, Setup, measure, tokens_text
from lib.metrics import evaluate


def evaluate_row(setup: Setup) -> Row:
    handle, batch = setup.handle, setup.batch
    t = measure(lambda: evaluate(handle, batch), lambda: handle.forward(batch.tokens), setup.repeats)
    return Row.timed("evaluate / plain forward", t, f"on {tokens_text(batch)}")


def handle_forward_row(setup: Setup) -> Row:
    """zoo:code-lm on its evaluation batch (16 x 256): `handle.forward` against the same
    checkpoint loaded by plain transformers with SDPA attention."""
    import torch
    from transformers import AutoModelForCausalLM

    from lib.data import default_batch
    from lib.models import load_model
    from lib.zoo import ZOO_DIR

    handle = load_model("zoo:code-lm")
    batch = default_batch(handle)
    hf = AutoModelForCausalLM.from_pretrained(str(ZOO_DIR / "code-lm"), attn_implementation="sdpa").eval()
    with torch.no_grad():
        t = measure(lambda: handle.forward(batch.tokens), lambda: hf(batch.tokens).logits, setup.repeats)
    return Row.timed("handle forward / HF sdpa forward", t, f"zoo:code-lm on {tokens_text(batch)} (bar <= 1.05)")


def bf16_forward_row(setup: Setup) -> Row:
    """The same GPT-2-small-shaped checkpoint loaded in bfloat16 (`load_model(dtype=...)`)
    against float32: the forward's cost; its weights take half the memory."""
    from lib.models import load_model

    handle, batch = setup.handle, setup.batch
    half = load_model(handle.spec, dtype="bfloat16")
    t = measure(lambda: half.forward(batch.tokens), lambda: handle.forward(batch.tokens), setup.repeats)
    return Row.timed("bf16 forward / fp32 forward", t, f"on {tokens_text(batch)}; weights "
                     f"{half.size_bits / 8 / 2**20:.0f} MiB vs {handle.size_bits / 8 / 2**20:.0f} MiB")


ROWS: tuple[Callable[[Setup], Row], ...] = (evaluate_row, handle_forward_row, bf16_forward_row)
