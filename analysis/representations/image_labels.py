"""Properties of digit images for the probes of an image model's stages, read from the
pixels themselves (no model involved), and the cells of the control task.

    ink_mass(images)            the sum of pixel intensities (pixels in [0, 1])
    stroke_thickness(images)    the mean, over ink pixels (intensity >= INK_THRESHOLD), of
                                the shorter of the horizontal and the vertical run of ink
                                through the pixel, in pixels
    halves(values, train)       two classes cut at the training images' median
    nearest_prototype(...)      the cell of each image: the index of its nearest prototype
                                (training images drawn with a fixed seed) in raw pixel space

Stroke thickness: a straight stroke w pixels wide, horizontal or vertical, measures w on
every one of its pixels (across the stroke the run is w, along it at least w); a diagonal
line one pixel wide measures 1; a pixel where two strokes cross measures the shorter arm, so
crossings add a little. On 8x8 digits most strokes are 1 or 2 pixels wide.

The control task for images (after Hewitt & Liang, who fix a random class per word type): an
image has no type, so the type is its cell, the nearest of N_PROTOTYPES prototypes by
Euclidean distance between raw pixels. Every cell gets one random class (drawn from the
property's class distribution, `probes.control_labels`), so the control labels depend on the
input alone, coarsely, and not on the property: a probe can only learn them by telling the
cells apart. A probe that reads a property far better than its control is not merely
memorising what the input looks like.
"""

from __future__ import annotations

import torch

INK_THRESHOLD = 0.5  # a pixel is ink from half the full intensity up
N_PROTOTYPES = 100  # cells of the control task (the images' "types")


def _check(images: torch.Tensor) -> torch.Tensor:
    """Images [N, 1, H, W] or [N, H, W] -> [N, H, W] float64."""
    if images.dim() == 4:
        images = images[:, 0]
    return images.double()


def ink_mass(images: torch.Tensor) -> torch.Tensor:
    """[N] the sum of each image's pixel intensities, from images [N, 1, H, W] in [0, 1]."""
    return _check(images).flatten(1).sum(1)


def _runs_along(ink: torch.Tensor, dim: int) -> torch.Tensor:
    """[N, H, W] the length of the run of ink along `dim` (1: vertical, 2: horizontal) through
    each ink pixel, 0 off the ink; ink is [N, H, W] float 0/1."""
    size = ink.shape[dim]
    forward = torch.zeros_like(ink)  # ink pixels in a row ending here, looking back
    backward = torch.zeros_like(ink)  # looking ahead
    before = torch.zeros_like(ink.select(dim, 0))
    for i in range(size):
        before = (before + 1) * ink.select(dim, i)
        forward.select(dim, i).copy_(before)
    after = torch.zeros_like(before)
    for i in reversed(range(size)):
        after = (after + 1) * ink.select(dim, i)
        backward.select(dim, i).copy_(after)
    return (forward + backward - 1).clamp_min(0) * ink


def stroke_thickness(images: torch.Tensor, threshold: float = INK_THRESHOLD) -> torch.Tensor:
    """[N] mean over ink pixels of min(horizontal run, vertical run) through the pixel, from
    images [N, 1, H, W]; 0 for an image without ink."""
    ink = (_check(images) >= threshold).double()  # [N, H, W]
    shortest = torch.minimum(_runs_along(ink, 2), _runs_along(ink, 1))  # [N, H, W], 0 off the ink
    return shortest.flatten(1).sum(1) / ink.flatten(1).sum(1).clamp_min(1)


def halves(values: torch.Tensor, train: torch.Tensor, unit: str = "", words: tuple[str, str] = ("low", "high")
           ) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Classes 0 (below) and 1 (at or above) [N] of `values` [N], cut at the median of the
    training values (`train` [N] bool), and their names with the cut point ("low (< 19.56)",
    "high (>= 19.56)"). Ties at the cut go to the upper class, so the halves need not be equal.

    Two classes, not three: a ridge probe regresses one-hot classes, and with three ordered
    classes of one quantity the middle one is masked (its regression line never wins the
    argmax; Hastie, Tibshirani & Friedman, ESL §4.2), so tertiles would understate what a
    linear read-out of the quantity gets."""
    cut = float(torch.quantile(values[train].double(), 0.5))
    codes = (values.double() >= cut).long()
    return codes, (f"{words[0]} (< {cut:.2f}{unit})", f"{words[1]} (>= {cut:.2f}{unit})")


def nearest_prototype(images: torch.Tensor, train: torch.Tensor, n_prototypes: int = N_PROTOTYPES,
                      seed: int = 0) -> torch.Tensor:
    """[N] index of each image's nearest prototype (Euclidean, raw pixels), the prototypes
    being `n_prototypes` training images (`train` [N] bool) drawn with `seed`."""
    pixels = _check(images).flatten(1)  # [N, H*W]
    candidates = torch.nonzero(train).flatten()
    pick = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:n_prototypes]
    prototypes = pixels[candidates[pick]]  # [K, H*W]
    return torch.cdist(pixels, prototypes).argmin(1)
