"""Linear probes of an image model's stages: what each stage's output knows about the digit
it reads (its class, its ink mass, its stroke thickness), with the machinery of the token
probes (`probes.probe_features`: ridge classifiers, majority class, control task).

    probe_images(handle)   every scikit-learn digit as the model reads it, with its properties
                           (from the clean digit, `image_labels`), its control-task cell and
                           the split -> ProbeImages
    probe_stages(handle)   one recorded pass (the input as depth 0, then every stage's
                           output, flattened), a probe per property and depth -> ProbeResult

The split is the model's own (`lib.corpus.digits_split`: stratified, fixed seed): probes
train on the images the model was trained on and are tested on its held-out images, the
ones its evaluation reads, so no test image was seen by the model or by the probe. For the
denoiser the model reads noisy copies (the held-out ones are exactly its evaluation batch)
and the properties are those of the clean digit beneath the noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.representations.image_labels import N_PROTOTYPES, halves, ink_mass, nearest_prototype, stroke_thickness
from analysis.representations.probes import RIDGE, ProbeResult, probe_features
from lib.corpus import DIGITS_NOISE_STD, add_digit_noise, digits_split
from lib.errors import CapabilityError, DataError
from lib.handle import ModelHandle, Point, check_handle
from lib.progress import Progress

IMAGE_PROPERTIES = ("digit_class", "ink_mass", "stroke_thickness")
IMAGE_PROPERTY_NAMES = {"digit_class": "class", "ink_mass": "ink mass", "stroke_thickness": "stroke thickness"}
EVAL_NOISE_SEED = 1234  # lib.data.digits_batch(denoise=True)'s noise: the test side is the evaluation batch
TRAIN_NOISE_SEED = 1


@dataclass(frozen=True)
class ProbeImages:
    """Images for the stage probes.

    inputs: [N, 1, H, W] what the model reads (noisy copies for a denoiser);
    clean: [N, 1, H, W] the digits the properties are read from;
    labels: property -> [N] int64 class index into `classes[property]`;
    cells: [N] int64 index of each input's nearest prototype (the control task's types);
    train: [N] bool, the probes' training images (the rest are their test images).
    """

    inputs: torch.Tensor
    clean: torch.Tensor
    labels: dict[str, torch.Tensor]
    classes: dict[str, tuple[str, ...]]
    cells: torch.Tensor
    train: torch.Tensor
    source: str


def label_images(clean: torch.Tensor, digits: torch.Tensor, train: torch.Tensor
                 ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, ...]]]:
    """Each image's class (`digits` [N]), ink mass and stroke thickness (halves cut at the
    training images' medians), from clean images [N, 1, H, W]; and the class names."""
    ink, ink_names = halves(ink_mass(clean), train, words=("light", "heavy"))
    thick, thick_names = halves(stroke_thickness(clean), train, " px", words=("thin", "thick"))
    labels = {"digit_class": digits.long(), "ink_mass": ink, "stroke_thickness": thick}
    classes = {"digit_class": tuple(str(c) for c in range(int(digits.max()) + 1)),
               "ink_mass": ink_names, "stroke_thickness": thick_names}
    return labels, classes


def _check_image_model(handle: ModelHandle) -> None:
    check_handle(handle)
    if handle.kind == "causal-lm":
        raise CapabilityError("Probes of image properties need an image model; this is a language model "
                              "(probe its residual stream with probe_layers).")


def probe_images(handle: ModelHandle, n_prototypes: int = N_PROTOTYPES) -> ProbeImages:
    """All scikit-learn digits as `handle` (an image model) reads them, with their properties,
    their control-task cells (the nearest of `n_prototypes` training images) and the split."""
    _check_image_model(handle)
    train_x, train_y = digits_split("train")
    test_x, test_y = digits_split("heldout")
    clean, digits = torch.cat([train_x, test_x]), torch.cat([train_y, test_y])
    train = torch.arange(len(digits)) < len(train_y)
    if handle.kind == "image-to-image":
        inputs = torch.cat([add_digit_noise(train_x, TRAIN_NOISE_SEED), add_digit_noise(test_x, EVAL_NOISE_SEED)])
        read = f"noisy copies (std {DIGITS_NOISE_STD}) of "
    else:
        inputs, read = clean, ""
    labels, classes = label_images(clean, digits, train)
    source = (f"{read}all {len(digits):,} scikit-learn digits: the probes train on the {int(train.sum()):,} the "
              f"model was trained on and are tested on its {int((~train).sum()):,} held-out ones; control-task cells: "
              f"the nearest of {n_prototypes} prototypes, training images drawn with a fixed seed")
    return ProbeImages(inputs, clean, labels, classes, nearest_prototype(inputs, train, n_prototypes), train, source)


def probe_stages(handle: ModelHandle, images: ProbeImages | None = None, ridge: float = RIDGE,
                 progress: Progress | None = None) -> ProbeResult:
    """Linear probes of every image property on the input (depth 0) and every stage's output
    of `handle`, from one recorded pass over `images` (default: `probe_images(handle)`).

        from lib.models import load_model
        from analysis.representations.stage_probes import probe_stages
        result = probe_stages(load_model("zoo:digits-cnn"))
        result.depth_labels, result.accuracy, result.control   # ("input", "conv1", ...), [P, D], [P, D]
    """
    _check_image_model(handle)
    images = images if images is not None else probe_images(handle)
    if not images.train.any() or images.train.all():
        raise DataError("The probes need training and test images; the split puts every image on one side.")
    if progress is not None:
        progress(0.0, "recording every stage's output")
    stages = [name for name, _ in handle.structure.stages]
    recorded = handle.record(images.inputs, [Point("stage", s) for s in stages])
    features = [images.inputs.flatten(1).float()]
    features += [recorded[Point("stage", s)].flatten(1).float().cpu() for s in stages]  # [N, features of the stage]
    props = [p for p in IMAGE_PROPERTIES if p in images.labels]
    labels = {p: images.labels[p] for p in props}
    accuracy, control, majority, alone, n_train, n_test = probe_features(
        features, labels, images.classes, images.cells, images.train, ridge, progress)
    return ProbeResult(tuple(props), tuple(images.classes[p] for p in props), ("input", *stages), accuracy.float(),
                       control.float(), majority.float(), alone.float(), n_train + n_test, n_train, n_test,
                       int(images.inputs.shape[0]), "model", images.source,
                       tuple(IMAGE_PROPERTY_NAMES[p] for p in props), "nearest prototype", "image")
