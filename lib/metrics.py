"""Quality and cost of a model on an evaluation batch, optionally against a base.

`evaluate` runs the model once; `metrics_from_outputs` turns outputs that were
already computed (e.g. by a drop sweep) into the same `Metrics` record.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lib.data import Batch, ImageBatch, TextBatch
from lib.handle import ModelHandle


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

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


LABELS = {
    "perplexity": "perplexity", "bits_per_byte": "bits per byte", "nll": "loss (nats/token)",
    "accuracy": "accuracy", "psnr_db": "PSNR (dB)", "agreement": "top-1 agreement with base",
    "kl_to_base": "KL(base || model)", "n_params": "parameters", "size_bits": "size (bits)",
    "latency_ms": "latency per batch (ms)",
}


def _log_probs(outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Class log-probabilities at predicted positions: [n, classes]."""
    if isinstance(batch, TextBatch):
        return F.log_softmax(outputs[:, :-1].float(), dim=-1).reshape(-1, outputs.shape[-1])
    return F.log_softmax(outputs.float(), dim=-1)


@dataclass(frozen=True)
class BaseOutputs:
    """Base outputs prepared once for many comparisons (a drop sweep, a recipe history).

    probs: [n, classes] base probabilities at predicted positions; neg_entropy: [n]
    sum p log p; top1: [n] base argmax.
    """

    probs: torch.Tensor
    neg_entropy: torch.Tensor
    top1: torch.Tensor


def prepare_base(base: torch.Tensor, batch: Batch) -> BaseOutputs:
    lp = _log_probs(base, batch)
    p = lp.exp()
    return BaseOutputs(p, torch.einsum("nc,nc->n", p, lp), lp.argmax(-1))


def kl_and_agreement(outputs: torch.Tensor, base: torch.Tensor | BaseOutputs, batch: Batch,
                     log_probs: torch.Tensor | None = None) -> tuple[float, float]:
    """Mean KL(base || model) and top-1 agreement over predicted positions."""
    ref = base if isinstance(base, BaseOutputs) else prepare_base(base, batch)
    lq = _log_probs(outputs, batch) if log_probs is None else log_probs
    kl = (ref.neg_entropy - torch.einsum("nc,nc->n", ref.probs, lq)).mean().clamp_min(0).item()
    agree = (lq.argmax(-1) == ref.top1).float().mean().item()
    return kl, agree


def metrics_from_outputs(
    outputs: torch.Tensor,
    batch: Batch,
    n_params: int,
    size_bits: int,
    base: torch.Tensor | BaseOutputs | None = None,
    latency_ms: float | None = None,
) -> Metrics:
    """Metrics from model outputs already computed on `batch`.

    outputs: LM logits [b, pos, vocab], classifier logits [b, classes] or images [b, 1, H, W].
    base: the base model's outputs on the same batch, for KL and agreement.
    """
    fields: dict[str, float | None] = {}
    log_probs = None
    if isinstance(batch, TextBatch):
        log_probs = _log_probs(outputs, batch)  # [n, vocab], shared by the NLL and the KL
        nll = -log_probs.gather(1, batch.tokens[:, 1:].reshape(-1, 1)).mean().item()
        fields.update(nll=nll, perplexity=math.exp(min(nll, 700.0)))
        if batch.n_bytes:
            fields["bits_per_byte"] = nll * batch.n_predicted / math.log(2) / batch.n_bytes
        if batch.answer_mask is not None:
            hit = outputs[:, :-1].argmax(-1) == batch.tokens[:, 1:]
            fields["accuracy"] = hit[batch.answer_mask[:, 1:]].float().mean().item()
    elif isinstance(batch, ImageBatch) and batch.targets is not None:
        mse = F.mse_loss(outputs.clamp(0, 1), batch.targets).item()
        fields["psnr_db"] = 10 * math.log10(1.0 / max(mse, 1e-12))
    else:
        fields["accuracy"] = (outputs.argmax(-1) == batch.labels).float().mean().item()
    if base is not None and not (isinstance(batch, ImageBatch) and batch.targets is not None):
        fields["kl_to_base"], fields["agreement"] = kl_and_agreement(outputs, base, batch, log_probs)
    return Metrics(n_params=n_params, size_bits=size_bits, latency_ms=latency_ms, **fields)


def model_inputs(batch: Batch) -> torch.Tensor:
    return batch.tokens if isinstance(batch, TextBatch) else batch.images


def evaluate(
    handle: ModelHandle,
    batch: Batch,
    base: torch.Tensor | None = None,
    size_bits: int | None = None,
) -> Metrics:
    """Run `handle` once on `batch` and measure quality, agreement with `base`
    outputs (if given), size and latency."""
    start = time.perf_counter()
    outputs = handle.forward(model_inputs(batch))
    latency_ms = (time.perf_counter() - start) * 1000
    bits = size_bits if size_bits is not None else handle.size_bits
    return metrics_from_outputs(outputs, batch, handle.n_params, bits, base, latency_ms)
