"""Outputs scored against targets and against a base model, in row chunks so that no
[batch, pos, vocab] log-probabilities are ever held: mean NLL of text, KL(base || model)
and top-1 agreement. `BaseOutputs` prepares the base once for many comparisons (a drop
sweep, a recipe history); `lib.metrics` turns the numbers into a `Metrics` record.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from lib.data import Batch, ImageBatch, TextBatch
from lib.errors import DataError
from lib.progress import set_in_thread


def check_finite(outputs: torch.Tensor, who: str = "model") -> None:
    """Refuse outputs holding NaN or inf: every score from them would be NaN, or an agreement
    or accuracy that counts them as misses."""
    if not bool(torch.isfinite(outputs).all()):
        raise DataError(f"The {who} produced NaN or infinite outputs on this batch, so nothing can be scored. "
                        "An edit can cause this (a weight scaled or quantized out of range): undo the last "
                        "change, or check the model's weights.")


@dataclass(frozen=True)
class ReadLogits:
    """A language model's logits [b, T, V] that are never held whole: read out from its
    final residual stream `resid` [b, T, d] (a few MiB) by `readout` a chunk of rows at a
    time, as the scoring here reads them. What the drop sweep and the Redundancy report
    score, so their memory does not grow with vocabulary x tokens (one float32 logits
    tensor of GPT-2 at 16 x 256 tokens is 823 MB)."""

    resid: torch.Tensor
    readout: Callable[[torch.Tensor], torch.Tensor]
    n_vocab: int
    # the block read out last, per thread: sessions score one shared base's logits at once
    _block: threading.local = field(default_factory=threading.local, compare=False, repr=False)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.resid.shape[:2], self.n_vocab))

    @property
    def device(self) -> torch.device:
        return self.resid.device

    def dim(self) -> int:
        return 3

    def rows(self, window: int, start: int, stop: int) -> torch.Tensor:
        """Logits [stop - start, V] of positions start..stop-1 of window `window`, from a
        block of READ_ROWS positions read out at once (one larger product is faster than
        several small ones; the scoring asks for the block's chunks in order)."""
        first = start - start % READ_ROWS
        if stop > first + READ_ROWS:
            return self.readout(self.resid[window, start:stop])
        block = self._block
        if getattr(block, "key", None) != (window, first):
            block.key, block.logits = None, None  # the old block goes before the new one is made
            block.logits = self.readout(self.resid[window, first:first + READ_ROWS])
            block.key = (window, first)
        return block.logits[start - first:stop - first]

    def argmax(self) -> torch.Tensor:
        """[b, T] the top-1 token at every position, chunk by chunk."""
        b, T = self.resid.shape[:2]
        step = chunk_rows(self.n_vocab)
        return torch.stack([torch.cat([self.rows(i, s, min(s + step, T)).argmax(-1)
                                       for s in range(0, T, step)]) for i in range(b)])


Logits = torch.Tensor | ReadLogits
READ_ROWS = 256  # positions a ReadLogits reads out at once: [256, vocab] float32, 51 MB at GPT-2's vocabulary
HELD_LOGITS_BYTES = 64 * 2**20  # logits up to this size are read out at once and held; larger ones chunk by chunk
# (64 MiB: a base and an edited model's logits, with a scoring temporary, stay well inside the 1 GiB of working
# memory issue 25 allows; at 256 MiB the Llama-1B shape's 2 x 256 windows, 251 MiB, were held and a lab edit
# that drops blocks peaked at weights + 1.04 GiB)


def logits_of(resid: torch.Tensor, readout: Callable[[torch.Tensor], torch.Tensor], n_vocab: int) -> Logits:
    """The logits of final residuals `resid` [b, T, d]: read out now where float32 logits
    take at most HELD_LOGITS_BYTES (faster to score), else a `ReadLogits` that reads them
    out a chunk at a time (memory bounded whatever the vocabulary and the batch)."""
    if resid.shape[0] * resid.shape[1] * n_vocab * 4 <= HELD_LOGITS_BYTES:
        return readout(resid)
    return ReadLogits(resid, readout, n_vocab)


def rows_of(outputs: Logits, window: int, start: int, stop: int) -> torch.Tensor:
    """LM logits [stop - start, V] of one window's positions start..stop-1, held or read out."""
    return outputs.rows(window, start, stop) if isinstance(outputs, ReadLogits) else outputs[window, start:stop]


@dataclass(frozen=True)
class BaseOutputs:
    """Base outputs prepared once for many comparisons (a drop sweep, a recipe history).

    logits: the base's outputs as given, not copied (LM logits [b, T, V], held or
    `ReadLogits`, or class logits [n, classes]): its probabilities p = exp(z - lse) are
    recomputed chunk by chunk where a KL needs them (`probs`), so no second tensor of the
    outputs' size is kept beside them;
    top1: [n] base argmax at the predicted positions; dot: [n] <p, z>; lse: [n] logsumexp(z).
    Then sum p log p = dot - lse, and KL(base || model) = (dot - <p, z'>) + (lse' - lse) for
    a model's logits z': exactly 0 when z' = z. nll: [n] lse - z_target of text, from the
    same pass: scoring these very logits (`text_scores`) reads them out no more.
    """

    logits: Logits
    top1: torch.Tensor
    dot: torch.Tensor
    lse: torch.Tensor
    nll: torch.Tensor | None = None

    @property
    def n_rows(self) -> int:
        return self.lse.shape[0]

    @property
    def n_classes(self) -> int:
        return self.logits.shape[-1]

    def probs(self, rows: slice) -> torch.Tensor:
        """p [rows, classes] in float32 at predicted positions `rows` (for text, a chunk of
        `_logit_chunks`: within one window), from the kept logits."""
        if self.logits.dim() == 2:
            z = self.logits[rows].float()
        else:
            per_window = self.logits.shape[1] - 1
            window, start = divmod(rows.start, per_window)
            stop = start + rows.stop - rows.start
            if stop > per_window:
                raise ValueError("A chunk of base probabilities lies within one window.")
            z = rows_of(self.logits, window, start, stop).float()
        return torch.exp(z - self.lse[rows, None])


def prepare_base(base: Logits, batch: Batch) -> BaseOutputs | torch.Tensor:
    """The base's distribution prepared for KL and agreement; an image-to-image model's
    outputs are images, not a distribution, and come back as they are."""
    if isinstance(batch, ImageBatch) and batch.targets is not None:
        return base
    if isinstance(batch, TextBatch):
        targets = batch.tokens[:, 1:].reshape(-1).to(base.device)
        top1s, dots, lses, nlls, start = [], [], [], [], 0
        for z, top1, lse in _logit_chunks(base, "base model"):
            # chunk by chunk, as text_scores computes <p, z'>; vecdot, not einsum("nc,nc->n"), whose
            # batched-matmul path is 9x slower on a [32, 50257] chunk
            dots.append(torch.linalg.vecdot(torch.exp(z - lse[:, None]), z))
            check_finite(dots[-1], who="base model")  # a -inf logit: 0 * -inf in <p, z>
            nlls.append(lse - z.gather(1, targets[start:start + len(top1), None])[:, 0])  # as text_scores has it
            start += len(top1)
            top1s.append(top1)
            lses.append(lse)
        return BaseOutputs(base, torch.cat(top1s), torch.cat(dots), torch.cat(lses), torch.cat(nlls))
    check_finite(base, "base model")
    z = base.float()
    lse = torch.logsumexp(z, -1)
    p = torch.exp(z - lse[:, None])
    return BaseOutputs(base, z.argmax(-1), torch.linalg.vecdot(p, z), lse)


# Logits rows scored at a time: a [rows, vocab] temporary instead of log-probs of the batch. As many rows as fit
# CHUNK_ELEMENTS (8 MB in float32: GPT-2 41 rows), at least 32 (vocabularies of 65k and more). Every chunk costs a
# dozen ops whatever its size, and a sync of the device: a [32, 257] chunk of a byte-level model was all overhead
# (on two cores an op costs ~0.1 ms more in a thread started while another thread's OpenMP pool is alive).
ROWS_PER_CHUNK = 32
CHUNK_ELEMENTS = 1 << 21


def chunk_rows(n_vocab: int) -> int:
    """Rows of [rows, n_vocab] logits scored at a time (`ROWS_PER_CHUNK`, more for a small vocabulary)."""
    return max(ROWS_PER_CHUNK, CHUNK_ELEMENTS // max(n_vocab, 1))


_TOLD = threading.local()  # `told`: what this thread's scoring tells of each window it finishes


def told_of_windows(told: Callable[[int, int], None]):
    """Inside, this thread's scoring of LM logits tells `told(k, n)` as it finishes the k-th
    of n windows (a bar over a readout, which costs `readout_blocks` blocks' work)."""
    return set_in_thread(_TOLD, "told", told)


def readout_blocks(handle) -> float:
    """What reading out and scoring one position's logits costs, in blocks' work (multiply-adds:
    d_model x d_vocab against one block's linear weights per token; the readout of GPT-2 small
    costs 5.5 blocks by this count, and took the time of 5.9 of its blocks on two CPU cores);
    0 for a model without blocks or vocabulary."""
    s = handle.structure
    per_block = sum(w.numel() for name, w in handle.linear_layers().items() if name.startswith("blocks."))
    if not s.n_layers or not s.d_vocab or not per_block:
        return 0.0
    return s.d_model * s.d_vocab / (per_block / s.n_layers)


def _window_chunks(T: int, V: int) -> list[tuple[int, int]]:
    """(first, end) of each chunk of a window's predicted rows 0..T-2, `chunk_rows(V)` at a time:
    how every LM scoring walks a window (`_logit_chunks`, and `_own_scores`, which must sum alike)."""
    step = chunk_rows(V)
    return [(start, min(start + step, T - 1)) for start in range(0, T - 1, step)]


def _logit_chunks(outputs: Logits, who: str = "model"
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """LM logits [b, T, V] at the predicted positions (all but the last of each window), in
    row chunks in order: (z [rows, V] float32, argmax [rows], logsumexp [rows]) each, from
    one max (which also gives the argmax) and one exp-sum over the chunk. A chunk holding
    NaN or inf is refused (`check_finite`, naming `who` made it) while it is in cache. Each
    window finished is told (`told_of_windows`)."""
    b, T, V = outputs.shape
    told = getattr(_TOLD, "told", None)
    for i in range(b):
        for start, stop in _window_chunks(T, V):
            z = rows_of(outputs, i, start, stop).float()
            top, top1 = z.max(-1)
            lse = top + (z - top[:, None]).exp_().sum(-1).log_()
            # NaN anywhere, +inf anywhere or a row of -inf makes its logsumexp non-finite: checking
            # [rows] numbers, not the chunk (a -inf logit alone, a token ruled out, is allowed)
            check_finite(lse, who)
            yield z, top1, lse
        if told is not None:
            told(i + 1, b)


def kl_and_agreement(outputs: torch.Tensor, base: torch.Tensor | BaseOutputs, batch: Batch) -> tuple[float, float]:
    """Mean KL(base || model) and top-1 agreement over predicted positions."""
    ref = base if isinstance(base, BaseOutputs) else prepare_base(base, batch)
    if isinstance(batch, TextBatch):
        _, kl, agree = text_scores(outputs, batch, ref)
        return kl, agree
    check_finite(outputs)
    z = outputs.float()  # class logits [n, classes]: one chunk, the same formula as text_scores
    kl = ((ref.dot - torch.linalg.vecdot(ref.probs(slice(0, ref.n_rows)), z)) + (torch.logsumexp(z, -1) - ref.lse)
          ).mean()
    return max(float(kl), 0.0), (z.argmax(-1) == ref.top1).float().mean().item()


@torch.no_grad()
def text_scores(outputs: Logits, batch: TextBatch, ref: BaseOutputs | None = None,
                per_row: dict[str, torch.Tensor] | None = None) -> tuple[float, float | None, float | None]:
    """Mean NLL, KL(base || model) and top-1 agreement over the predicted positions of LM
    logits [b, T, V], without log-probabilities of the whole batch: with log q = z - lse(z),
    NLL = lse - z_target and KL = (dot - <p, z>) + (lse - lse_base) (see `BaseOutputs`).
    per_row: a dict that receives each predicted position's "nll", "kl" (with a base) and
    "top1" [n] from the same pass, on the CPU (`lib.spread` keeps them)."""
    if ref is not None and ref.nll is not None and ref.logits is outputs:  # the base against itself
        return _own_scores(ref, per_row)
    targets = batch.tokens[:, 1:].reshape(-1).to(outputs.device)
    nll = kl = agree = 0.0
    start = 0
    kept: dict[str, list[torch.Tensor]] = {"nll": [], "kl": [], "top1": []}
    for z, top1, lse in _logit_chunks(outputs):
        rows = slice(start, start + z.shape[0])
        start += z.shape[0]
        row_nll = lse - z.gather(1, targets[rows, None])[:, 0]
        nll += float(row_nll.sum())
        row_kl = None
        if ref is not None:
            row_kl = (ref.dot[rows] - torch.linalg.vecdot(ref.probs(rows), z)) + (lse - ref.lse[rows])
            kl += float(row_kl.sum())
            agree += float((top1 == ref.top1[rows]).sum())
        if per_row is not None:  # only when asked: a sweep of many models keeps none of it
            for name, value in (("nll", row_nll), ("top1", top1), ("kl", row_kl)):
                if value is not None:
                    kept[name].append(value)
    if per_row is not None:  # moved once, after the loop
        per_row.update({name: torch.cat(rows).cpu() for name, rows in kept.items() if rows})
    check_finite(torch.tensor([nll, kl]))  # a -inf logit where the target or the base's mass is
    if ref is None:
        return nll / start, None, None
    return nll / start, max(kl / start, 0.0), agree / start


def _own_scores(ref: BaseOutputs, per_row: dict[str, torch.Tensor] | None) -> tuple[float, float, float]:
    """`text_scores` of the base's own logits against their prepared pass, from that pass: the
    same NLL, KL 0 and agreement 1 (what the formulas give when z' = z), no readout."""
    b, T, V = ref.logits.shape
    nll, start = 0.0, 0
    for _ in range(b):  # summed chunk by chunk as `text_scores` sums: the very same number
        for first, stop in _window_chunks(T, V):
            nll += float(ref.nll[start:start + stop - first].sum())
            start += stop - first
    check_finite(torch.tensor([nll]))  # a -inf logit where a target is
    if per_row is not None:
        per_row.update(nll=ref.nll.cpu(), top1=ref.top1.cpu(), kl=torch.zeros_like(ref.nll).cpu())
    return nll / start, 0.0, 1.0
