"""The bundled demo models: small networks trained here by `python -m lib.zoo.train`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # "causal-lm" | "image-classifier" | "image-to-image"
    description: str
    data: str


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            "code-lm", "causal-lm",
            "A byte-level GPT-2 trained on Python source: the default model.",
            "The Python standard library of the training interpreter, except the held-out "
            "files of `lib.data` (every 50th file of the sorted list); evaluated on those.",
        ),
        ZooEntry(
            "induction-2l", "causal-lm",
            "A 2-layer attention-only transformer that learned induction: it copies the "
            "token that followed the previous occurrence of the current token.",
            "Fresh random token sequences whose second half repeats the first.",
        ),
        ZooEntry(
            "digits-cnn", "image-classifier",
            "A small ReLU CNN with max-pooling that classifies 8x8 digits.",
            "scikit-learn digits, 75/25 stratified split with seed 0 (`lib.data.digits_split`).",
        ),
        ZooEntry(
            "digits-denoiser", "image-to-image",
            "A small ReLU convolutional network that maps noisy 8x8 digits to clean ones.",
            "scikit-learn digits (same split) with Gaussian noise of std 0.3, clipped to [0, 1].",
        ),
    ]
}
