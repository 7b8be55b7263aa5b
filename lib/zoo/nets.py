"""Plain torch image models of the zoo, built by name from a small config.

Each network is a sequence of named stages (`self.stages`), so a handle can record
stage outputs with forward hooks, and a stage whose input and output shapes match
can be bypassed.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """ReLU CNN with max-pooling for 8x8 digits: [batch, 1, 8, 8] -> logits [batch, 10]."""

    def __init__(self, width: int = 32, n_classes: int = 10) -> None:
        super().__init__()
        self.stages = nn.ModuleDict({
            "conv1": nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU()),
            "conv2": nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()),
            "pool1": nn.MaxPool2d(2),  # [b, w, 4, 4]
            "conv3": nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU()),
            "pool2": nn.MaxPool2d(2),  # [b, 2w, 2, 2]
            "flatten": nn.Flatten(),
            "fc1": nn.Sequential(nn.Linear(8 * width, 64), nn.ReLU()),
            "head": nn.Linear(64, n_classes),
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages.values():
            x = stage(x)
        return x


class DigitsDenoiser(nn.Module):
    """ReLU conv encoder-decoder, noisy [batch, 1, 8, 8] -> clean [batch, 1, 8, 8].

    Strided convolutions bring the digit down to 2x2 so every output pixel sees the
    whole input (the shape prior that makes denoising work); transposed
    convolutions bring it back. No normalisation: the network is piecewise affine.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stages = nn.ModuleDict({
            "conv1": nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.ReLU()),  # [b, w, 8, 8]
            "down1": nn.Sequential(nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.ReLU()),  # 4x4
            "down2": nn.Sequential(nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1), nn.ReLU()),  # 2x2
            "mid": nn.Sequential(nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.ReLU()),  # 2x2
            "up1": nn.Sequential(nn.ConvTranspose2d(4 * w, 2 * w, 4, stride=2, padding=1), nn.ReLU()),
            "up2": nn.Sequential(nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.ReLU()),
            "out": nn.Conv2d(w, 1, 3, padding=1),
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages.values():
            x = stage(x)
        return x


ARCHITECTURES: dict[str, tuple[type[nn.Module], str]] = {
    "digits-cnn": (DigitsCNN, "image-classifier"),
    "digits-denoiser": (DigitsDenoiser, "image-to-image"),
}


def build(architecture: str, **kwargs) -> nn.Module:
    if architecture not in ARCHITECTURES:
        raise KeyError(f"unknown image architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture][0](**kwargs)
