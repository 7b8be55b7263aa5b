"""What dropping layers really costs: measured by removing them (METHODS §1,
measured drop sensitivity).

The single-part sweep reuses the residuals of one cached pass, so layers before the
dropped one are never recomputed; several parts are dropped together through
`analysis.compress.prune.pruning.dropping`, whose hooks are always removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from analysis.compress.prune.pruning import Drop, dropping
from analysis.redundancy.similarity import Residuals, final_logits
from lib.data import Batch, ImageBatch, TextBatch, check_batch
from lib.errors import AnalysisError, require_type
from lib.handle import ModelHandle
from lib.metrics import Metrics, metrics_from_outputs, model_inputs
from lib.progress import Progress
from lib.scoring import BaseOutputs, Logits, logits_of, prepare_base, told_of_windows

LM_KINDS = ("block", "attention", "mlp")


@dataclass(frozen=True)
class DropSweep:
    """Base metrics and the metrics with each single part dropped.

    dropped: part -> Metrics measured with only that part removed;
    not_droppable: part -> reason, for parts that cannot be removed on their own.
    """

    base: Metrics
    dropped: dict[Drop, Metrics]
    not_droppable: dict[Drop, str]

    def delta(self, drop: Drop, metric: str) -> float:
        return getattr(self.dropped[drop], metric) - getattr(self.base, metric)


def _metrics(handle: ModelHandle, outputs: Logits, batch: Batch,
             base: torch.Tensor | BaseOutputs | None) -> Metrics:
    return metrics_from_outputs(outputs, batch, handle.n_params, handle.size_bits, base)


def evaluate_dropped(handle: ModelHandle, batch: Batch, drops: Sequence[Drop],
                     base: torch.Tensor | BaseOutputs | None) -> Metrics:
    """Metrics with all `drops` removed together (one full forward under hooks)."""
    check_batch(handle, batch)
    require_type(drops, (list, tuple), "The parts to drop")
    with dropping(handle, drops):
        outputs = handle.forward(model_inputs(batch))
    return _metrics(handle, outputs, batch, base)


@torch.no_grad()
def lm_dropped_together(handle: ModelHandle, batch: TextBatch, res: Residuals, drops: Sequence[Drop],
                        base: torch.Tensor | BaseOutputs | None) -> Metrics:
    """`evaluate_dropped` for a language model from its recorded pass `res`: the blocks from
    the first dropped part on run again, each with its dropped sublayer (a block whose
    attention and MLP are both dropped passes its input on, as a dropped block does)."""
    if res.batch_digest != batch.digest:
        raise AnalysisError("These residuals were recorded on another batch; record them on this one.")
    kinds: dict[int, set[str]] = {}
    for drop in drops:
        kinds.setdefault(drop.layer, set()).add(drop.kind)
    first, last = min(kinds), max(kinds)
    resid = res.resid[first]
    for layer in range(first, last + 1):
        dropped = kinds.get(layer, set())
        if "block" in dropped or {"attention", "mlp"} <= dropped:
            continue
        resid = handle.blocks.run(layer, resid, drop=next(iter(dropped)) if dropped else None)
    return _metrics(handle, _run_from(handle, last + 1, resid), batch, base)


@torch.no_grad()
def _run_from(handle: ModelHandle, start: int, resid: torch.Tensor) -> Logits:
    """Blocks start..L-1 on resid [batch, pos, d], then the readout: logits (held, or read
    out chunk by chunk as they are scored when they would be large; `lib.scoring.logits_of`)."""
    for layer in range(start, handle.structure.n_layers):
        resid = handle.blocks.run(layer, resid)
    return logits_of(resid, handle.blocks.readout, handle.structure.d_vocab)


@torch.no_grad()
def lm_drop_sweep(handle: ModelHandle, batch: TextBatch, res: Residuals,
                  kinds: Sequence[str] = LM_KINDS, progress: Progress | None = None,
                  so_far: dict | None = None) -> DropSweep:
    """Metrics with each single block / attention / MLP dropped, reusing the cached
    h_l and m_l: dropping part l only reruns layers l..L-1 (blocks and MLPs: l+1..L-1;
    m_l is what block l gives with its MLP dropped, in a parallel block too).
    Parts the model does not have (the MLPs of an attention-only model) are listed
    in `not_droppable`. so_far: a dict the caller keeps across an interrupted sweep; it
    receives the base's metrics ("base") and each drop's as it is measured ("dropped"),
    and drops already there are not measured again (`stopped_sweep` reads it meanwhile)."""
    unknown = [k for k in kinds if k not in LM_KINDS]
    if unknown:
        raise AnalysisError(f"A language model's parts are {', '.join(LM_KINDS)}; {', '.join(map(repr, unknown))} "
                            "is not one.")
    if res.batch_digest != batch.digest:
        raise AnalysisError("These residuals were recorded on another batch; record them on this one.")
    L, tell = handle.structure.n_layers, progress or (lambda fraction, message: None)
    jobs = [Drop(kind, layer) for kind in kinds for layer in range(L)]
    skipped = {d: reason for d in jobs if (reason := handle.drop_problem(d))}
    jobs = [d for d in jobs if d not in skipped]
    so_far = {} if so_far is None else so_far
    out: dict[Drop, Metrics] = so_far.setdefault("dropped", {})
    # the bar moves by FLOPs (`_drop_costs`): the base's readouts first, then each drop's blocks and scoring
    _, readout, costs = _drop_costs(handle, batch.tokens.shape[1], jobs)
    total, done = 3 * readout + sum(costs[d] for d in jobs if d not in out), 0.0

    def scoring(what: str, share: float) -> Iterator[None]:
        return told_of_windows(lambda k, n: tell((done + share * k / n) / total, f"{what}: scoring window {k} of {n}"))

    base_logits = final_logits(handle, res)
    with scoring("the model as it is", readout):
        reference = prepare_base(base_logits, batch)  # base softmax once, not once per drop
    done = readout
    if "base" not in so_far:
        with scoring("the model as it is", 2 * readout):  # its logits and the reference's, read out again
            so_far["base"] = _metrics(handle, base_logits, batch, reference)
    done = 3 * readout
    base = so_far["base"]
    for drop in jobs:
        if drop in out:  # measured before the sweep was stopped
            continue
        tell(done / total, f"dropping {drop.part}")
        if drop.kind == "block":
            logits = _run_from(handle, drop.layer + 1, res.resid[drop.layer])
        elif drop.kind == "mlp":
            logits = _run_from(handle, drop.layer + 1, res.mid[drop.layer])
        else:
            after = handle.blocks.run(drop.layer, res.resid[drop.layer], drop="attention")
            logits = _run_from(handle, drop.layer + 1, after)
        done += costs[drop] - 2 * readout
        with scoring(f"dropping {drop.part}", 2 * readout):
            out[drop] = _metrics(handle, logits, batch, reference)
        done += 2 * readout
    return DropSweep(base, dict(out), skipped)


STOPPED = "not measured: the sweep was stopped before it"


def stopped_sweep(handle: ModelHandle, so_far: dict, kinds: Sequence[str] = LM_KINDS) -> DropSweep:
    """What a stopped `lm_drop_sweep` measured (its `so_far`), the parts it did not reach
    listed in `not_droppable` as not measured (STOPPED), beside those the model cannot drop."""
    jobs = [Drop(kind, layer) for kind in kinds for layer in range(handle.structure.n_layers)]
    measured = dict(so_far.get("dropped", {}))
    if "base" not in so_far:
        raise AnalysisError("Nothing was measured before the sweep stopped: run it again.")
    missing = {d: handle.drop_problem(d) or STOPPED for d in jobs if d not in measured}
    return DropSweep(so_far["base"], measured, missing)


def _drop_costs(handle: ModelHandle, seq_len: int, parts: Sequence[Drop]) -> tuple[float, float, dict[Drop, float]]:
    """FLOPs per token of a block, of a readout, and of measuring each single drop of `parts`: a block
    costs 2 x its linear weights + 4 T d (attention over T keys), a readout 2 d V; dropping
    part l reruns the blocks after it (an attention drop block l too) and reads out once,
    and scoring against the base reads the base's logits out again where they are not held."""
    s, L = handle.structure, handle.structure.n_layers
    block = 2 * sum(w.numel() for name, w in handle.linear_layers().items() if name.startswith("blocks.0.")) \
        + 4 * seq_len * s.d_model
    readout = 2 * s.d_model * s.d_vocab
    reruns = {"block": 0, "mlp": 0, "attention": 1}  # blocks rerun beyond those after the dropped part
    return block, readout, {d: (L - 1 - d.layer + reruns[d.kind]) * block + 2 * readout for d in parts}


def sweep_in_forwards(handle: ModelHandle, seq_len: int, kinds: Sequence[str] = LM_KINDS) -> float:
    """What `lm_drop_sweep` costs in forwards of the same batch, from FLOPs per token
    (`_drop_costs`): an estimate for the page to show before the sweep starts (measured
    forward x this)."""
    s = handle.structure
    parts = [Drop(k, l) for k in kinds for l in range(s.n_layers) if not (k == "mlp" and not s.d_mlp)]
    block, readout, costs = _drop_costs(handle, seq_len, parts)
    return sum(costs.values()) / (s.n_layers * block + readout)


@torch.no_grad()
def naive_lm_drop_sweep(handle: ModelHandle, batch: TextBatch, kinds: Sequence[str] = LM_KINDS) -> DropSweep:
    """The same sweep by full reruns under hooks (the reference for tests and bench)."""
    base_logits = handle.forward(batch.tokens)
    reference = prepare_base(base_logits, batch)
    base = _metrics(handle, base_logits, batch, reference)
    jobs = [Drop(k, l) for k in kinds for l in range(handle.structure.n_layers)]
    out = {d: evaluate_dropped(handle, batch, [d], reference) for d in jobs if not handle.drop_problem(d)}
    return DropSweep(base, out, {})


@torch.no_grad()
def stage_drop_sweep(handle: ModelHandle, batch: ImageBatch) -> DropSweep:
    """Metrics with each bypassable stage replaced by the identity."""
    check_batch(handle, batch)
    base_out = handle.forward(batch.images)
    base = _metrics(handle, base_out, batch, base_out)
    out, skipped = {}, {}
    for name, _ in handle.structure.stages:
        drop = Drop("stage", name)
        reason = handle.drop_problem(drop)
        if reason:
            skipped[drop] = reason
            continue
        out[drop] = evaluate_dropped(handle, batch, [drop], base_out)
    return DropSweep(base, out, skipped)
