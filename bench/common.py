"""Shared pieces: the GPT-2-small-shaped model, its tokens, and a robust timer."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lib.data import TextBatch
from lib.handle import ModelHandle


@dataclass(frozen=True)
class Row:
    name: str
    ratio: float
    detail: str

    def line(self) -> str:
        return f"{self.name:<44} {self.ratio:7.3f}  {self.detail}"


def gpt2_small(n_layer: int = 12) -> ModelHandle:
    """A GPT-2-small-shaped model (d 768, 12 heads, vocab 50257) with random weights,
    saved to a temp folder and loaded through `load_model` like a user's checkpoint."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lib.models import load_model
    from lib.zoo.tokenizer import save_byte_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="bench-gpt2-"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=n_layer)).save_pretrained(str(folder))
    save_byte_tokenizer(folder, 1024)
    return load_model(str(folder))


def random_batch(batch: int = 8, seq: int = 128, vocab: int = 50257) -> TextBatch:
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return TextBatch(tokens, batch * (seq - 1), True, "random tokens")


def median_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_pair(fn: Callable[[], object], reference: Callable[[], object], repeats: int = 5) -> tuple[float, float]:
    """Median seconds of `fn` and `reference`, measured interleaved so drift hits both."""
    fn(), reference()
    a, b = [], []
    for _ in range(repeats):
        for f, store in ((fn, a), (reference, b)):
            start = time.perf_counter()
            f()
            store.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)
