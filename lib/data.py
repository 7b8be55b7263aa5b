"""Evaluation sets: held-out Python source, user text, and scikit-learn digits.

Everything here is deterministic: the same interpreter gives the same file list,
the same held-out split and the same batches, so metrics are comparable across
sessions and the bundled code LM is never evaluated on text it was trained on.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lib.errors import DataError  # noqa: F401 - re-exported

HELDOUT_EVERY = 50  # every 50th file of the sorted stdlib list is held out


@dataclass(frozen=True)
class TextBatch:
    """A fixed batch of token windows for a causal LM.

    tokens: [batch, pos] int64, each row starts with BOS when `has_bos`.
    n_bytes: UTF-8 bytes of the predicted text (positions 1..pos-1 of every row),
        the denominator of bits per byte; 0 for synthetic token tasks.
    answer_mask: [batch, pos] bool, True where a token is a task answer (top-1
        accuracy is measured there), or None for plain text.
    """

    tokens: torch.Tensor
    n_bytes: int
    has_bos: bool
    source: str
    answer_mask: torch.Tensor | None = None

    @property
    def n_predicted(self) -> int:
        return int(self.tokens.shape[0] * (self.tokens.shape[1] - 1))


@dataclass(frozen=True)
class ImageBatch:
    """Images with labels (classifier) or clean targets (image-to-image).

    images: [batch, 1, 8, 8] float32 in [0, 1]; labels: [batch] int64;
    targets: [batch, 1, 8, 8] clean images for a denoiser, else None.
    """

    images: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor | None
    source: str


Batch = TextBatch | ImageBatch


# --------------------------------------------------------------------------- text


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """All `.py` files of the running interpreter's standard library, sorted by
    relative path, excluding `site-packages` (third-party code, not stdlib)."""
    root = stdlib_root()
    files = [
        f for f in root.rglob("*.py")
        if "site-packages" not in f.relative_to(root).parts and f.is_file()
    ]
    return tuple(sorted(files, key=lambda f: f.relative_to(root).as_posix()))


def heldout_files() -> tuple[Path, ...]:
    """Every 50th file of `stdlib_files()`: never seen by the bundled code LM."""
    return stdlib_files()[::HELDOUT_EVERY]


def training_files() -> tuple[Path, ...]:
    held = set(heldout_files())
    return tuple(f for f in stdlib_files() if f not in held)


def read_bytes(files: Sequence[Path]) -> list[bytes]:
    return [f.read_bytes() for f in files]


def windows_from_ids(
    ids: Sequence[int], seq_len: int, bos_id: int | None, max_windows: int | None = None
) -> torch.Tensor:
    """Cut one long id sequence into non-overlapping rows of `seq_len` tokens,
    each starting with BOS when `bos_id` is given. Returns [n, seq_len] int64."""
    body = seq_len - (1 if bos_id is not None else 0)
    n = len(ids) // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(
            f"The text is too short: it has {len(ids)} tokens, but one evaluation window "
            f"needs {body}. Use a longer text or a shorter window."
        )
    rows = torch.tensor(list(ids[: n * body]), dtype=torch.long).view(n, body)
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), rows], dim=1)
    return rows


def _count_bytes(tokenizer, rows: torch.Tensor) -> int:
    """UTF-8 bytes of the predicted tokens: every column but the first."""
    text_bytes = 0
    for row in rows[:, 1:].tolist():
        text_bytes += len(tokenizer.decode(row, clean_up_tokenization_spaces=False).encode("utf-8"))
    return text_bytes


def text_batch(
    tokenizer, text: str, seq_len: int, max_windows: int | None = None, source: str = "text"
) -> TextBatch:
    """Evaluation batch from arbitrary user text: [n, seq_len] windows with BOS."""
    if not text or not text.strip():
        raise DataError("The text is empty. Type or upload some text to evaluate on.")
    bos_id = tokenizer.bos_token_id
    ids = tokenizer.encode(text, add_special_tokens=False)
    rows = windows_from_ids(ids, seq_len, bos_id, max_windows)
    return TextBatch(rows, _count_bytes(tokenizer, rows), bos_id is not None, source)


def code_batch(tokenizer, seq_len: int = 128, n_windows: int = 16) -> TextBatch:
    """The default LM evaluation batch: held-out stdlib source, concatenated in
    file order, cut into `n_windows` windows of `seq_len` tokens (BOS first).

    Windows are spread evenly over the held-out text so the batch samples many
    files, not just the first one.
    """
    text = "\n".join(b.decode("utf-8", errors="replace") for b in read_bytes(heldout_files()))
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos_id = tokenizer.bos_token_id
    body = seq_len - (1 if bos_id is not None else 0)
    total = len(ids) // body
    if total < n_windows:
        raise DataError(f"Held-out text gives only {total} windows of {body} tokens.")
    picks = np.linspace(0, total - 1, n_windows).round().astype(int)
    rows = [ids[i * body:(i + 1) * body] for i in picks]
    tokens = torch.tensor(rows, dtype=torch.long)
    if bos_id is not None:
        tokens = torch.cat([torch.full((n_windows, 1), bos_id, dtype=torch.long), tokens], 1)
    return TextBatch(tokens, _count_bytes(tokenizer, tokens),
                     bos_id is not None, f"held-out stdlib source ({n_windows}x{seq_len})")


def repeated_token_sequences(
    n: int, vocab: int, bos_id: int, seq_len: int, gen: torch.Generator,
    min_half: int = 6, max_half: int = 30,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The induction task: BOS, a block of h distinct random tokens (h varies per row),
    the same block again, then random filler. Returns tokens [n, seq_len] and a mask
    [n, seq_len], True on the repeated block from its second token on: those are
    predictable by induction (the first one is not: nothing says the copy starts)."""
    if seq_len < 1 + 2 * max_half:
        raise DataError(f"Sequences of {seq_len} tokens cannot hold BOS and two copies of "
                        f"{max_half} tokens; use at least {1 + 2 * max_half}.")
    if vocab < max_half:
        raise DataError(f"A vocabulary of {vocab} tokens cannot fill a block of {max_half} distinct tokens.")
    tokens = torch.randint(0, vocab, (n, seq_len), generator=gen)
    tokens[:, 0] = bos_id
    halves = torch.randint(min_half, max_half + 1, (n,), generator=gen)
    mask = torch.zeros(n, seq_len, dtype=torch.bool)
    for i, h in enumerate(halves.tolist()):
        # distinct tokens in the block: every copy has exactly one earlier occurrence to follow
        tokens[i, 1:1 + h] = torch.randperm(vocab, generator=gen)[:h]
        tokens[i, 1 + h:1 + 2 * h] = tokens[i, 1:1 + h]
        mask[i, 2 + h:1 + 2 * h] = True
    return tokens, mask


def repeated_tokens_batch(vocab: int, bos_id: int, seq_len: int, n: int = 64, seed: int = 99) -> TextBatch:
    """Fixed evaluation batch of the induction task (accuracy on the repeated half)."""
    tokens, mask = repeated_token_sequences(n, vocab, bos_id, seq_len, torch.Generator().manual_seed(seed))
    return TextBatch(tokens, 0, True, f"repeated random tokens ({n}x{seq_len})", mask)


# --------------------------------------------------------------------------- digits

DIGITS_NOISE_STD = 0.5  # the denoiser's task: Gaussian noise of this std on [0, 1] pixels


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits, split 75/25 stratified with a fixed seed.

    Returns images [n, 1, 8, 8] float32 in [0, 1] and labels [n] int64.
    """
    from sklearn.model_selection import train_test_split

    images, labels = _digits()
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=0.25, random_state=0, stratify=labels)
    pick = {"train": np.sort(train_idx), "heldout": np.sort(test_idx)}[split]
    return torch.from_numpy(images[pick]).unsqueeze(1), torch.from_numpy(labels[pick])


def add_digit_noise(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Noisy copies of `images` [n, 1, 8, 8]: Gaussian noise, clipped to [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=gen) * DIGITS_NOISE_STD
    return (images + noise).clamp(0.0, 1.0)


def digits_batch(n: int | None = None, denoise: bool = False) -> ImageBatch:
    """Held-out digits: for a classifier the images and labels; for the denoiser
    noisy inputs (fixed seed) with the clean images as targets."""
    images, labels = digits_split("heldout")
    if n is not None:
        images, labels = images[:n], labels[:n]
    if denoise:
        return ImageBatch(add_digit_noise(images, seed=1234), labels, images,
                          f"held-out digits, noisy (std {DIGITS_NOISE_STD})")
    return ImageBatch(images, labels, None, "held-out digits")


# --------------------------------------------------------------------------- dispatch


def default_batch(handle, n_windows: int = 16, seq_len: int = 256) -> Batch:
    """The fixed evaluation batch that fits `handle` (a `lib.handle.ModelHandle`); LM
    windows are as long as the model's context allows, up to `seq_len` tokens."""
    if handle.eval_task == "digits":
        return digits_batch()
    if handle.eval_task == "noisy-digits":
        return digits_batch(denoise=True)
    s = handle.structure
    if handle.eval_task == "repeated-tokens":
        return repeated_tokens_batch(s.d_vocab - 1, handle.tokenizer.bos_token_id, s.n_ctx)
    return code_batch(handle.tokenizer, seq_len=min(seq_len, s.n_ctx), n_windows=n_windows)
