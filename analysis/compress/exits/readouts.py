"""Where and through what an early exit reads its prediction (METHODS.md §6): the checked
depths of a model, the lenses it can exit through (`analysis.lens`: the logit lens and a
tuned lens for language models; for classifiers linear exit heads, trained here), and the
trained lenses kept per model fingerprint so that nothing trains one twice."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F

from analysis import lens as lenses
from analysis.lens import LOGIT_LENS, ExitLens, pooled
from lib import corpus
from lib.errors import AnalysisError
from lib.handle import ModelHandle
from lib.progress import Progress

_CACHE_SIZE = 4


class ExitError(AnalysisError):
    """The model or its data cannot be read out early this way; the message says why."""


def exit_depths(handle: ModelHandle) -> tuple[int, ...]:
    """The depths where an exit is checked: for an LM after every block but the last
    (1..L-1); for a classifier after every stage with weights but the last (pooling and
    flattening stages add nothing a head could use)."""
    if handle.kind == "causal-lm":
        return tuple(range(1, handle.structure.n_layers))
    if handle.kind == "image-classifier":
        names = [name for name, _ in handle.structure.stages]
        weighted = {handle.place(layer)[0] for layer in handle.linear_layers()}
        return tuple(k for k in range(1, len(names)) if names[k - 1] in weighted)
    return ()


def lens_choices(handle: ModelHandle) -> tuple[str, ...]:
    """The lenses this model can exit through: LMs the logit lens and, with an affine
    unembedding, the tuned lens; classifiers their exit heads; other models none."""
    if handle.kind == "causal-lm":
        return ("logit", "tuned") if handle.blocks.unembedding() is not None else ("logit",)
    return ("heads",) if handle.kind == "image-classifier" else ()


def check_exits(handle: ModelHandle, lens: str) -> None:
    """Refuse a model that cannot exit early, or a lens it cannot use, with what to do."""
    if handle.kind not in ("causal-lm", "image-classifier"):
        raise ExitError(f"Early exits need a language model or a classifier; this is an {handle.kind} model, "
                        "whose output is an image, with nothing to read out at an earlier layer.")
    if not exit_depths(handle):
        raise ExitError("This model has no layer before its last one to exit at.")
    choices = lens_choices(handle)
    if lens not in choices:
        if handle.kind == "image-classifier":
            why = "a classifier exits through its trained linear heads"
        elif lens == "tuned":
            why = "the tuned lens needs an affine unembedding, which this model does not have"
        else:
            why = "a language model exits through the logit lens or a tuned lens"
        raise ExitError(f"This model cannot exit through lens {lens!r}: {why}. Choose {' or '.join(choices)}.")


# ---------------------------------------------------------------------- trained lenses

_TRAINED: OrderedDict[tuple[str, str], ExitLens] = OrderedDict()
_TRAINED_LOCK = threading.Lock()


def has_trained(handle: ModelHandle, kind: str) -> bool:
    """Whether a trained lens of `kind` for this model's weights is already at hand."""
    with _TRAINED_LOCK:
        return (handle.fingerprint, kind) in _TRAINED


def exit_lens(handle: ModelHandle, lens: str | ExitLens, progress: Progress | None = None) -> ExitLens:
    """The lens `lens` names for this model: the logit lens, or a tuned lens / exit heads
    trained on first use and kept per model fingerprint (the last few models). An
    `ExitLens` given itself is used as it is."""
    if isinstance(lens, ExitLens):
        check_exits(handle, lens.kind)
        return lens
    check_exits(handle, lens)
    if lens == "logit":
        return LOGIT_LENS
    with _TRAINED_LOCK:
        if (handle.fingerprint, lens) in _TRAINED:
            _TRAINED.move_to_end((handle.fingerprint, lens))
            return _TRAINED[(handle.fingerprint, lens)]
    trained = lenses.train_tuned_lens(handle, progress) if lens == "tuned" else train_exit_heads(handle, progress)
    remember_lens(handle, trained)
    return trained


def remember_lens(handle: ModelHandle, lens: ExitLens) -> None:
    """Keep a trained lens for this model's weights, where `exit_lens` (and so the
    early-exit edit) finds it: e.g. one a page trained with its own progress bar and
    cached itself."""
    check_exits(handle, lens.kind)
    with _TRAINED_LOCK:
        _TRAINED[(handle.fingerprint, lens.kind)] = lens
        _TRAINED.move_to_end((handle.fingerprint, lens.kind))
        while len(_TRAINED) > _CACHE_SIZE:
            _TRAINED.popitem(last=False)




def train_exit_heads(handle: ModelHandle, progress: Progress | None = None, steps: int = 25) -> ExitLens:
    """Linear exit heads on the pooled features of every exit stage, trained by
    cross-entropy (L-BFGS, a little weight decay) on the training digits: seconds."""
    check_exits(handle, "heads")
    images, labels = corpus.digits_split("train")
    states, outputs = handle.exit_states(images)
    n_classes = outputs.shape[-1]
    depths = exit_depths(handle)
    weights, biases = {}, {}
    for i, depth in enumerate(depths):
        if progress:
            progress(i / len(depths), f"exit heads: stage {i + 1} of {len(depths)}")
        features = pooled(states[depth]).detach()  # [n, C]
        mean, scale = features.mean(0), features.std(0).clamp_min(1e-6)
        head = torch.nn.Linear(features.shape[1], n_classes)
        with torch.no_grad():  # zeroed directly: another session's meta build switches torch.nn.init off
            head.weight.zero_()
            head.bias.zero_()
        optimiser = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
        standard = (features - mean) / scale  # standardised: L-BFGS converges in about 20 steps

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            loss = F.cross_entropy(head(standard), labels) + 1e-3 * head.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimiser.step(closure)
        weight = head.weight.detach() / scale  # folded back onto the raw pooled features
        weights[depth], biases[depth] = weight, head.bias.detach() - weight @ mean
    if progress:
        progress(1.0, "exit heads: done")
    return ExitLens("heads", weights, biases, handle.fingerprint)
