"""Quality and cost of a model on an evaluation batch, optionally against a base.

`evaluate` runs the model once; `metrics_from_outputs` turns outputs that were
already computed (e.g. by a drop sweep) into the same `Metrics` record; the scores
behind it (NLL, KL to a base, top-1 agreement) are `lib.scoring`'s, its timing
`lib.latency`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from lib.data import Batch, DataError, ImageBatch, TextBatch, check_batch
from lib.errors import require_int
from lib.handle import ModelHandle
from lib.latency import base_timing, timed_outputs
from lib.scoring import BaseOutputs, Logits, ReadLogits, check_finite, kl_and_agreement, prepare_base, text_scores


@dataclass(frozen=True)
class Metrics:
    """One evaluation. Fields that do not apply to the model's kind are None.

    kl_to_base: mean KL(base || model) in nats per predicted token (or image);
    agreement: share of positions where model and base agree on the top-1 class.
    """

    n_params: int
    size_bits: int
    latency_ms: float | None = None
    nll: float | None = None
    perplexity: float | None = None
    bits_per_byte: float | None = None
    accuracy: float | None = None
    psnr_db: float | None = None
    agreement: float | None = None
    kl_to_base: float | None = None


LABELS = {
    "perplexity": "perplexity", "bits_per_byte": "bits per byte", "nll": "loss (nats/token)",
    "accuracy": "accuracy", "psnr_db": "PSNR (dB)", "agreement": "top-1 agreement with base",
    "kl_to_base": "KL(base || model)", "n_params": "parameters", "size_bits": "size (bits)",
    "latency_ms": "latency (ms)",
}
# The order every page and table lists a model's metrics in: quality, then agreement with
# a base, then cost. A model has only some of them (the fields of `Metrics` that are not None).
QUALITY_FIELDS = ("bits_per_byte", "perplexity", "nll", "accuracy", "psnr_db")
METRIC_FIELDS = QUALITY_FIELDS + ("kl_to_base", "agreement", "n_params", "size_bits", "latency_ms")


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _expected_outputs(batch: Batch) -> str:
    if isinstance(batch, TextBatch):
        return f"[{batch.tokens.shape[0]}, {batch.tokens.shape[1]}, vocab]"
    if batch.targets is not None:
        return str(_shape(batch.targets))
    return f"[{batch.images.shape[0]}, classes]"


def _fits(outputs: torch.Tensor, batch: Batch) -> bool:
    if isinstance(batch, TextBatch):
        return outputs.dim() == 3 and outputs.shape[:2] == batch.tokens.shape
    if batch.targets is not None:
        return outputs.shape == batch.targets.shape
    return outputs.dim() == 2 and outputs.shape[0] == batch.images.shape[0]


def check_base(base: torch.Tensor | BaseOutputs | None, batch: Batch) -> None:
    """Refuse base outputs that cannot have been computed on `batch` (checked before a forward)."""
    if base is None:
        return
    if isinstance(base, BaseOutputs):
        n = batch.n_predicted
        if base.n_rows != n:
            raise DataError(f"The prepared base outputs cover {base.n_rows} predicted positions but this "
                            f"batch has {n}: they come from a different batch. Prepare them on this batch.")
        return
    if not isinstance(base, (torch.Tensor, ReadLogits)) or not _fits(base, batch):
        got = _shape(base) if isinstance(base, (torch.Tensor, ReadLogits)) else type(base).__name__
        raise DataError(f"The base outputs have shape {got}, but outputs on this batch are "
                        f"{_expected_outputs(batch)}: the base was computed on a different batch. "
                        "Compute the base outputs on this batch.")


def check_outputs(outputs: torch.Tensor, batch: Batch, base: torch.Tensor | BaseOutputs | None = None) -> None:
    """Refuse outputs whose shape does not fit `batch`, targets (token ids, labels) that
    the outputs cannot score, and a `base` of another shape than `outputs`."""
    if not isinstance(batch, (TextBatch, ImageBatch)):
        raise DataError(f"Expected a TextBatch or an ImageBatch from lib.data; got {type(batch).__name__}.")
    if not _fits(outputs, batch):
        raise DataError(f"The outputs have shape {_shape(outputs)}, but on this batch they should be "
                        f"{_expected_outputs(batch)}: outputs and batch do not belong together.")
    if isinstance(batch, TextBatch) or batch.targets is None:
        targets = batch.tokens[:, 1:] if isinstance(batch, TextBatch) else batch.labels
        classes = outputs.shape[-1]
        if int(targets.min()) < 0 or int(targets.max()) >= classes:
            what = "token ids" if isinstance(batch, TextBatch) else "labels"
            raise DataError(f"The batch's {what} range from {int(targets.min())} to {int(targets.max())}, but "
                            f"the outputs score only 0..{classes - 1}: the batch was made for another model.")
    check_base(base, batch)
    if isinstance(base, (torch.Tensor, ReadLogits)) and base.shape != outputs.shape:
        raise DataError(f"The base outputs have shape {_shape(base)} but these outputs {_shape(outputs)}: "
                        "the base comes from a different batch or model. Compute it on this batch.")
    if isinstance(base, BaseOutputs) and base.n_classes != outputs.shape[-1]:
        raise DataError(f"The prepared base outputs have {base.n_classes} classes but these outputs "
                        f"{outputs.shape[-1]}: they come from a different model.")


def metrics_from_outputs(
    outputs: Logits,
    batch: Batch,
    n_params: int,
    size_bits: int,
    base: Logits | BaseOutputs | None = None,
    latency_ms: float | None = None,
    per_row: dict[str, torch.Tensor] | None = None,
) -> Metrics:
    """Metrics from model outputs already computed on `batch`.

    outputs: LM logits [b, pos, vocab] (held, or `ReadLogits` read out chunk by chunk),
    classifier logits [b, classes] or images [b, 1, H, W].
    base: the base model's outputs on the same batch, for KL and agreement.
    per_row: for text, a dict that receives every predicted position's scores from the
    same pass (`lib.scoring.text_scores`; `lib.spread.position_scores` reads it).
    Outputs or a base that do not fit the batch are refused (`check_outputs`).
    """
    check_outputs(outputs, batch, base)
    batch = _on(batch, outputs.device)  # a model on a GPU: its outputs are scored there
    if not isinstance(batch, TextBatch):  # text logits are checked chunk by chunk as they are scored
        check_finite(outputs)
    fields: dict[str, float | None] = {}
    if isinstance(batch, TextBatch):
        ref = None if base is None else base if isinstance(base, BaseOutputs) else prepare_base(base, batch)
        nll, kl, agree = text_scores(outputs, batch, ref, per_row)  # one chunked pass for the NLL and the KL
        fields.update(nll=nll, perplexity=math.exp(min(nll, 700.0)))
        if ref is not None:
            fields.update(kl_to_base=kl, agreement=agree)
        if batch.n_bytes:
            fields["bits_per_byte"] = nll * batch.n_predicted / math.log(2) / batch.n_bytes
        if batch.answer_mask is not None:
            top1 = outputs.argmax() if isinstance(outputs, ReadLogits) else outputs.argmax(-1)
            hit = top1[:, :-1] == batch.tokens[:, 1:]
            fields["accuracy"] = hit[batch.answer_mask[:, 1:]].float().mean().item()
    elif isinstance(batch, ImageBatch) and batch.targets is not None:
        fields["psnr_db"] = psnr_db(outputs, batch.targets)
    else:
        fields["accuracy"] = (outputs.argmax(-1) == batch.labels).float().mean().item()
    if base is not None and isinstance(batch, ImageBatch) and batch.targets is None:
        fields["kl_to_base"], fields["agreement"] = kl_and_agreement(outputs, base, batch)
    return Metrics(n_params=n_params, size_bits=size_bits, latency_ms=latency_ms, **fields)


def _on(batch: Batch, device: torch.device) -> Batch:
    """`batch` with every tensor it holds on `device` (itself when they are there)."""
    tensors = {f.name: value for f in fields(batch) if isinstance(value := getattr(batch, f.name), torch.Tensor)}
    if all(t.device == device for t in tensors.values()):
        return batch
    return replace(batch, **{name: t.to(device) for name, t in tensors.items()})


def psnr_db(images: torch.Tensor, targets: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of images [b, 1, H, W] against targets, both in [0, 1]
    (images clamped to it first): 10 log10(1 / MSE)."""
    mse = F.mse_loss(images.clamp(0, 1), targets).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def input_psnr_db(batch: ImageBatch) -> float | None:
    """The PSNR of a denoising batch's noisy inputs themselves against the clean targets:
    what a model that changes nothing scores, the reference for a denoiser's PSNR (None
    for a batch without targets)."""
    return None if batch.targets is None else psnr_db(batch.images, batch.targets)


def model_inputs(batch: Batch) -> torch.Tensor:
    return batch.tokens if isinstance(batch, TextBatch) else batch.images


def evaluate(
    handle: ModelHandle,
    batch: Batch,
    base: torch.Tensor | None = None,
    size_bits: int | None = None,
    latency_repeats: int = 0,
) -> Metrics:
    """Run `handle` on `batch` and measure quality, agreement with `base` outputs (if
    given), size and latency: with `latency_repeats` > 0 the median of at least that many
    timed forwards after the one that gave the outputs (`base_timing`), else the time of
    the pass that gave the outputs (`ModelHandle.outputs`: large logits are read out later).
    A batch or base that does not fit the model is refused first (`check_batch`, `check_base`)."""
    check_batch(handle, batch)
    if size_bits is not None:
        require_int(size_bits, "size_bits (the model's size in bits)", 0, 2**62)
    require_int(latency_repeats, "latency_repeats (timed forwards)", 0, 1000)
    check_base(base, batch)
    inputs = model_inputs(batch)
    outputs, seconds = timed_outputs(handle, inputs)
    latency_ms = seconds * 1000
    if latency_repeats > 0:
        latency_ms = base_timing(handle, inputs, seconds, latency_repeats).median_ms
    bits = size_bits if size_bits is not None else handle.size_bits
    return metrics_from_outputs(outputs, batch, handle.n_params, bits, base, latency_ms)
