"""The bundled demo models: small networks trained here by `python -m lib.zoo.train`, one
folder each (weights, config, MODEL_CARD.md), listed in `ZOO`.

    nets            the plain torch image networks, built by name from a small config
    tokenizer       the byte-level tokenizer of the language models
    train           `python -m lib.zoo.train <name>`: train one model, write its folder and card
    train_code_lm, train_induction, train_digits   each model's training
"""

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
            "files of `lib.corpus` (every 50th file of the sorted list); evaluated on those.",
        ),
        ZooEntry(
            "induction-2l", "causal-lm",
            "A 2-layer attention-only transformer that learned induction: it copies the "
            "token that followed the previous occurrence of the current token.",
            "Fresh synthetic sequences, half of each batch of each kind: BOS, a block of 6-30 "
            "distinct random tokens, the same block again, random filler; and in-context Markov "
            "chains (each sequence its own 10 states and Dirichlet(0.3) transitions), which make "
            "the model grow a previous-token head feeding an induction head. Accuracy is measured "
            "on the repeated block from its second token on (the first is unpredictable). Head "
            "scores: TransformerLens `detect_head` (\"mul\"), mean over 8 sequences of three "
            "copies of 15 distinct tokens (with two copies even a perfect induction head scores "
            "about 0.49, since only the second copy's rows have a target).",
        ),
        ZooEntry(
            "digits-cnn", "image-classifier",
            "A small ReLU CNN with max-pooling that classifies 8x8 digits.",
            "scikit-learn digits, 75/25 stratified split with seed 0 (`lib.corpus.digits_split`).",
        ),
        ZooEntry(
            "digits-denoiser", "image-to-image",
            "A small ReLU convolutional network that maps noisy 8x8 digits to clean ones.",
            "scikit-learn digits (same split) with heavy Gaussian noise of std 0.5, clipped to [0, 1].",
        ),
    ]
}


def zoo_name(spec: str) -> str | None:
    """The bundled model's name for a spec like "zoo:code-lm" (None for anything else)."""
    name = spec[4:] if spec.startswith("zoo:") else None
    return name if name in ZOO else None


def model_card(spec: str) -> str | None:
    """The MODEL_CARD.md text of a bundled model (None for other models)."""
    name = zoo_name(spec)
    card = ZOO_DIR / name / "MODEL_CARD.md" if name else None
    return card.read_text() if card is not None and card.exists() else None

