"""The raw material of the evaluation sets and of the bundled models' training: the
running interpreter's standard library split into held-out and training files, and
scikit-learn's digits split into training and held-out images.

Deterministic: the same interpreter gives the same file list and split, so the bundled
code LM is never evaluated on text it was trained on (`lib.data` builds the batches).
"""

from __future__ import annotations

import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

HELDOUT_EVERY = 50  # every 50th file of the sorted stdlib list is held out


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
