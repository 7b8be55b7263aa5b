"""Shared pieces: the GPT-2-small-shaped model and its tokens, the machine header, and
interleaved timing that gives every row a median ratio and its spread.

A row is a few lines in a suite:

    def my_row(setup: Setup) -> Row:
        t = measure(lambda: thing(setup.handle), lambda: setup.handle.forward(setup.batch.tokens), setup.repeats)
        return Row.timed("thing / forward", t, "what it depends on, e.g. 8x128 tokens")
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from lib.data import TextBatch
from lib.handle import ModelHandle

REPEATS = 3  # interleaved repetitions per row, at least three
SPREAD = "± = half the range (max - min) of the per-repetition ratios"


@dataclass(frozen=True)
class Setup:
    """What every row measures on: the bench model, its batch, repetitions per row."""

    handle: ModelHandle
    batch: TextBatch
    repeats: int = REPEATS


@dataclass(frozen=True)
class Timing:
    """Seconds per repetition of a measured function and its reference; measured[i] and
    reference[i] ran back to back, so their ratio sees the same machine state."""

    measured: tuple[float, ...]
    reference: tuple[float, ...]

    @classmethod
    def of(cls, fn: Callable[[], object], reference: Callable[[], object]) -> Timing:
        """One pair, timed back to back without a warm-up (for rows whose one run is minutes)."""
        start = time.perf_counter()
        fn()
        middle = time.perf_counter()
        reference()
        return cls((middle - start,), (time.perf_counter() - middle,))

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(a / b for a, b in zip(self.measured, self.reference))

    def ms(self) -> str:
        """Median times of both, e.g. '412 ms vs 380 ms'."""
        return f"{_ms(self.measured)} vs {_ms(self.reference)}"


def _ms(seconds: Sequence[float]) -> str:
    median = statistics.median(seconds)
    if median < 0.01:
        return f"{median * 1000:.2f} ms"
    return f"{median * 1000:.0f} ms" if median < 1 else f"{median:.2f} s"


def measure(fn: Callable[[], object], reference: Callable[[], object], repeats: int = REPEATS) -> Timing:
    """Time `fn` and `reference` in `repeats` interleaved pairs after one warm-up each;
    the order within a pair alternates, so a drift in machine speed favours neither."""
    if repeats < 3:
        raise ValueError(f"A bench row needs at least 3 repetitions, not {repeats}.")
    fn(), reference()
    measured, ref = [], []
    for k in range(repeats):
        pair = ((fn, measured), (reference, ref))
        for f, store in pair if k % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            f()
            store.append(time.perf_counter() - start)
    return Timing(tuple(measured), tuple(ref))


def ratio_text(ratios: Sequence[float]) -> str:
    """Median and spread (`SPREAD`) of per-repetition ratios: '1.083 ±0.031'."""
    return f"{statistics.median(ratios):.3f} ±{(max(ratios) - min(ratios)) / 2:.3f}"


@dataclass(frozen=True)
class Row:
    """One bench line: `ratio` is the median of the per-repetition ratios (each one
    measured / reference of an interleaved pair), not a ratio of medians."""

    name: str
    ratios: tuple[float, ...]
    detail: str

    @classmethod
    def timed(cls, name: str, timing: Timing, detail: str = "") -> Row:
        """A row whose detail starts with both median times."""
        return cls(name, timing.ratios, timing.ms() + (f"; {detail}" if detail else ""))

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> float:
        return (max(self.ratios) - min(self.ratios)) / 2

    def line(self) -> str:
        return f"{self.name:<50} {self.ratio:7.3f} ±{self.spread:.3f}  {self.detail}"


def header_line() -> str:
    return f"{'name':<50} {'ratio':>7} {'±':>6}  detail"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_lines() -> list[str]:
    """Where the numbers were taken: CPU model, logical CPUs, torch and its thread count."""
    return [f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads; Python {platform.python_version()}"]


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
    """Random token windows [batch, seq] (the bench measures cost, not quality)."""
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return TextBatch(tokens, batch * (seq - 1), True, "random tokens")


def tokens_text(batch: TextBatch) -> str:
    """'8x128 tokens'."""
    return "x".join(map(str, batch.tokens.shape)) + " tokens"
