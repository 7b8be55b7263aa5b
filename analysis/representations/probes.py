"""Linear probes per depth: how well a linear map reads each code property from the
residual stream, next to what a reader gets for free.

    probe_layers(handle)   one recorded pass over `dataset.probe_text(handle)` (the residual
                           stream entering every block and the last block's output), then
                           one probe per property and depth -> ProbeResult
    probe_features(...)    the probes alone, on any features (a notebook, the tests)

A probe is a ridge-regression classifier: standardised features Z centred on its training
tokens, one-hot targets Y, the closed-form solution W = (ZᵀZ + λ·n·I)⁻¹ Zᵀ(Y − Ȳ), argmax of
ZW + Ȳ. It is deterministic (no seed, no iterations), and one Gram matrix per depth serves
every property (see `_probe_depth`), so all probes of a depth cost about one Gram matrix.

Three references make an accuracy readable. The majority class: the share of test tokens
in the training set's most frequent class. The token alone: each test token answered with
its token type's most frequent class in training (what the input itself tells; depth 0
holds little more). The control task (Hewitt & Liang 2019,
"Designing and Interpreting Probes with Control Tasks"): each token type (token id) gets
one random class, drawn from the property's own class distribution, and the same probe is
trained on those labels; it can only succeed by memorising token identities. Selectivity
= accuracy − control accuracy: high when the property is read from context, not from the
token alone. Image models (`stage_probes`) use the same machinery with an image's nearest
prototype in raw pixels as its type (see `image_labels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from analysis.representations.dataset import PROPERTIES, PROPERTY_NAMES, ProbeText, probe_text
from lib.data import check_lm
from lib.errors import DataError
from lib.handle import ModelHandle, Point
from lib.progress import Progress

RIDGE = 1e-2  # λ per training token, on standardised features
TEST_SHARE = 0.25
SEED = 0


@dataclass(frozen=True)
class ProbeResult:
    """Test accuracy of a linear probe per property and depth, with its references.

    properties: P property keys (`dataset.PROPERTIES`, `stage_probes.IMAGE_PROPERTIES`);
        names: as shown ("token kind"); classes: their class names.
    depth_labels: D names of the depths probed: for a language model "0".."L" (depth d is
        the residual stream entering block d, depth L the last block's output); for an image
        model "input", then each stage whose output was probed.
    accuracy, control: [P, D] test accuracy of the probe on the property and on its
        control task; majority: [P] test accuracy of always answering the training set's
        most frequent class; token_alone: [P] of answering each type's most frequent
        training class (types unseen in training: the majority class), a type being the
        token id, or for images the cell of the nearest prototype (`baseline_name` says which).
    n_labelled, n_train, n_test: [P] tokens (images) labelled, used for training, for testing.
    n_positions: tokens (images) a probe could read (BOS excluded); split: "file" (no file in
    both training and test windows), "window", or "model" (images: trained on the model's
    training images, tested on its held-out ones); source: the data's description;
    unit: "token" or "image".
    """

    properties: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]
    depth_labels: tuple[str, ...]
    accuracy: torch.Tensor
    control: torch.Tensor
    majority: torch.Tensor
    token_alone: torch.Tensor
    n_labelled: torch.Tensor
    n_train: torch.Tensor
    n_test: torch.Tensor
    n_positions: int
    split: str
    source: str
    names: tuple[str, ...]
    baseline_name: str = "token alone"
    unit: str = "token"

    def depth_name(self, d: int) -> str:
        """Depth d in words: "depth 3", "the input", "stage conv2"."""
        label = self.depth_labels[d]
        return f"depth {label}" if label.isdigit() else "the input" if label == "input" else f"stage {label}"

    @property
    def selectivity(self) -> torch.Tensor:
        """[P, D] accuracy − control accuracy (Hewitt & Liang)."""
        return self.accuracy - self.control


def split_windows(window_file: torch.Tensor, test_share: float = TEST_SHARE, seed: int = SEED
                  ) -> tuple[torch.Tensor, str]:
    """Training windows [n] bool and how they were split: whole files go to the test side
    (in a seeded random order) until it holds `test_share` of the windows, so no file is on
    both sides; with a single file, windows are split instead. Both sides are never empty."""
    n = int(window_file.shape[0])
    if n < 2:
        raise DataError(f"Probes need at least 2 windows (one to train on, one to test on), not {n}.")
    gen = torch.Generator().manual_seed(seed)
    files = torch.unique(window_file)
    train = torch.ones(n, dtype=torch.bool)
    if len(files) >= 2:
        for f in files[torch.randperm(len(files), generator=gen)][:-1]:
            train &= window_file != f
            if (~train).sum() >= test_share * n:
                break
        return train, "file"
    test = torch.randperm(n, generator=gen)[:max(1, min(n - 1, round(test_share * n)))]
    train[test] = False
    return train, "window"


def control_labels(labels: torch.Tensor, token_ids: torch.Tensor, n_classes: int, seed: int = SEED) -> torch.Tensor:
    """Hewitt & Liang's control task: every type (`token_ids` [N]: a token id, or an image's
    nearest prototype) gets one class, drawn (seeded) from the class distribution of `labels`
    [N] (-1 unlabelled, kept -1); returns [N]."""
    found = labels[labels >= 0]
    if not len(found):
        return labels.clone()
    weights = torch.bincount(found, minlength=n_classes).double()
    types = int(token_ids.max()) + 1
    assigned = torch.multinomial(weights, types, replacement=True, generator=torch.Generator().manual_seed(seed))
    return torch.where(labels >= 0, assigned[token_ids], labels)


def _one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, n_classes).float()  # [n, classes]


Group = tuple[torch.Tensor, list[tuple[torch.Tensor, int]]]  # (tokens labelled [N] bool, [(labels [N], classes)])


def _probe_depth(x: torch.Tensor, train: torch.Tensor, groups: Sequence[Group], ridge: float) -> list[list[float]]:
    """Test accuracy of a ridge classifier per target of every group, on features x [N, d].

    Features are standardised once over every training token any group labels, and their
    Gram matrix ZᵀZ [d, d] is computed once: a group's own is that minus the Gram of the
    training rows it leaves out, centred with the group's mean, so all probes of a depth
    cost about one Gram matrix and one Cholesky solve per group."""
    union = torch.zeros_like(train)
    for mask, _ in groups:
        union |= mask
    rows = union & train
    x_train = x[rows].float()
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-6)
    z = (x_train - mean) / std  # [n, d]
    gram, total = z.T @ z, z.sum(0)  # [d, d], [d]
    eye = torch.eye(z.shape[1])
    out = []
    for mask, targets in groups:
        keep = mask[rows]  # [n]: the union's training rows this group uses
        left_out = z[~keep]
        n = int(keep.sum())
        centre = (total - left_out.sum(0)) / n  # [d]
        centred_gram = gram - left_out.T @ left_out - n * torch.outer(centre, centre)  # Σ (z − μ)(z − μ)ᵀ
        y = torch.cat([_one_hot(labels[rows][keep], c) for labels, c in targets], 1)  # [n, sum of classes]
        y_mean = y.mean(0)
        factor = torch.linalg.cholesky(centred_gram + ridge * n * eye)
        weights = torch.cholesky_solve((z[keep] - centre).T @ (y - y_mean), factor)  # [d, sum of classes]
        test = mask & ~train
        scores = ((x[test].float() - mean) / std - centre) @ weights + y_mean  # [m, sum of classes]
        accuracies, start = [], 0
        for labels, c in targets:
            accuracies.append(float((scores[:, start:start + c].argmax(1) == labels[test]).double().mean()))
            start += c
        out.append(accuracies)
    return out


def probe_features(features: Sequence[torch.Tensor], labels: dict[str, torch.Tensor],
                   classes: dict[str, Sequence[str]], types: torch.Tensor, train: torch.Tensor,
                   ridge: float = RIDGE, progress: Progress | None = None
                   ) -> tuple[torch.Tensor, ...]:
    """Probe every property at every depth: the one probe machinery behind `probe_layers`
    (tokens) and `stage_probes.probe_stages` (images).

    features: D tensors [N, d] (one per depth, the same N positions or images); labels:
    property -> [N] int64 (-1 unlabelled); classes: property -> class names; types: [N]
    int64 >= 0, the control task's types (token ids; for images the nearest prototype's
    index), also what the lookup baseline answers from; train: [N] bool, the rest is the
    test set.
    Returns accuracy [P, D], control accuracy [P, D], the majority and token-alone
    baselines [P], and the training and test token counts [P] (P in the order of `labels`).
    """
    if not isinstance(ridge, (int, float)) or not ridge > 0:
        raise DataError(f"The ridge penalty is a number > 0 (per training token), not {ridge!r}.")
    props = list(labels)
    masks = {p: labels[p] >= 0 for p in props}
    for p in props:
        if not (masks[p] & train).any() or not (masks[p] & ~train).any():
            raise DataError(f"No labelled token of '{p}' is on both the training and the test side; "
                            "use more windows.")
    control = {p: control_labels(labels[p], types, len(classes[p]), SEED + i) for i, p in enumerate(props)}
    groups: list[list[str]] = []
    for p in props:  # properties labelled on the same tokens share one Gram matrix per depth
        same = next((group for group in groups if torch.equal(masks[group[0]], masks[p])), None)
        if same is None:
            groups.append([p])
        else:
            same.append(p)
    accuracy = torch.zeros(len(props), len(features), dtype=torch.float64)
    control_acc = torch.zeros_like(accuracy)
    member_lists = groups
    fitted = [(masks[m[0]], [(labels[p], len(classes[p])) for p in m] + [(control[p], len(classes[p])) for p in m])
              for m in member_lists]
    for d, x in enumerate(features):
        scores = _probe_depth(x, train, fitted, ridge)
        for members, found in zip(member_lists, scores):
            for k, p in enumerate(members):
                accuracy[props.index(p), d], control_acc[props.index(p), d] = found[k], found[len(members) + k]
        if progress is not None:
            progress((d + 1) / len(features), f"depth {d} of {len(features) - 1}")
    majority = torch.zeros(len(props), dtype=torch.float64)
    token_alone = torch.zeros_like(majority)
    for i, p in enumerate(props):
        majority[i], token_alone[i] = _lookup_baselines(labels[p], masks[p], types, train, len(classes[p]))
    n_train = torch.tensor([int((masks[p] & train).sum()) for p in props])
    n_test = torch.tensor([int((masks[p] & ~train).sum()) for p in props])
    return accuracy, control_acc, majority, token_alone, n_train, n_test


def _lookup_baselines(labels: torch.Tensor, mask: torch.Tensor, token_ids: torch.Tensor, train: torch.Tensor,
                      n_classes: int) -> tuple[float, float]:
    """Test accuracy of the training set's most frequent class, and of each token type's."""
    rows_train, rows_test = mask & train, mask & ~train
    top = torch.bincount(labels[rows_train], minlength=n_classes).argmax()
    counts = torch.zeros(int(token_ids.max()) + 1, n_classes)  # [types, classes]
    counts.index_put_((token_ids[rows_train], labels[rows_train]), torch.ones(int(rows_train.sum())), accumulate=True)
    per_type = torch.where(counts.sum(1) > 0, counts.argmax(1), top)  # [types]
    test = labels[rows_test]
    return float((test == top).double().mean()), float((per_type[token_ids[rows_test]] == test).double().mean())


def depth_points(handle: ModelHandle) -> list[Point]:
    """The residual stream entering every block, then the last block's output: L + 1 depths."""
    L = handle.structure.n_layers
    return [Point("resid_pre", layer) for layer in range(L)] + [Point("resid_post", L - 1)]


RECORDING_SHARE = 0.9  # of a probe's progress bar: the recorded pass, block by block; the fits share the rest


def probe_layers(handle: ModelHandle, text: ProbeText | None = None, ridge: float = RIDGE,
                 progress: Progress | None = None) -> ProbeResult:
    """Linear probes of every code property at every depth of `handle`, from one recorded
    pass over `text` (default: `probe_text(handle)`, the held-out source the model is
    evaluated on).

        from lib.models import load_model
        from analysis.representations import probe_layers
        result = probe_layers(load_model("zoo:code-lm"))
        result.accuracy, result.control, result.majority   # [P, D], [P, D], [P]
    """
    check_lm(handle, "Linear probes of the residual stream")
    text = text if text is not None else probe_text(handle)
    points = depth_points(handle)
    fitting = None
    if progress is None:
        recorded = handle.record(text.tokens.to(handle.device), points)
    else:  # the recorded pass takes most of the time (zoo:code-lm: 2.2 of 2.6 s)
        progress(0.0, "recording the residual stream at every depth")
        with handle.told_of_blocks(lambda k, n: progress(RECORDING_SHARE * k / n,
                                                         f"recording the residual stream: {k} of {n} blocks")):
            recorded = handle.record(text.tokens.to(handle.device), points)

        def fitting(fraction: float, message: str) -> None:
            progress(RECORDING_SHARE + (1 - RECORDING_SHARE) * fraction, message)
    start = 1 if text.has_bos else 0
    features = [recorded[p][:, start:].reshape(-1, recorded[p].shape[-1]).float().cpu() for p in points]  # [N, d]
    labels = {p: text.labels[p][:, start:].reshape(-1) for p in PROPERTIES}  # [N]
    token_ids = text.tokens[:, start:].reshape(-1)
    train_windows, split = split_windows(text.window_file)
    train = train_windows[:, None].expand(-1, text.tokens.shape[1] - start).reshape(-1)  # [N]
    accuracy, control, majority, alone, n_train, n_test = probe_features(features, labels, text.classes, token_ids,
                                                                         train, ridge, fitting)
    return ProbeResult(PROPERTIES, tuple(text.classes[p] for p in PROPERTIES),
                       tuple(str(d) for d in range(len(points))), accuracy.float(), control.float(), majority.float(),
                       alone.float(), n_train + n_test, n_train, n_test, text.n_positions, split, text.source,
                       tuple(PROPERTY_NAMES[p] for p in PROPERTIES))
