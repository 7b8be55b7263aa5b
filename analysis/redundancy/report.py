"""Everything the Redundancy view shows for one model: statistics, suggested drops,
predicted vs measured cost, and sentences derived from the numbers."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from analysis.compress.prune.pruning import Drop
from analysis.lens import LogitLens, logit_lens
from analysis.metric_text import metric_change, metric_value
from analysis.redundancy import drops as layer_drop
from analysis.redundancy import similarity as redundancy
from analysis.redundancy.drops import DropSweep
from analysis.redundancy.similarity import LayerSimilarity, Residuals, StageSimilarity
from lib.data import Batch, ImageBatch, TextBatch, check_batch
from lib.errors import require_type
from lib.handle import ModelHandle
from lib.metrics import LABELS, Metrics, model_inputs
from lib.progress import Progress
from lib.scoring import BaseOutputs, Logits


@dataclass(frozen=True)
class RedundancyReport:
    """LMs fill `similarity` and `lens`; image models fill `stages`. `metric` is the
    quality measure the drop costs are expressed in (higher_is_better says its sign);
    `batch_digest` identifies the evaluation batch every number was measured on."""

    sweep: DropSweep
    metric: str
    higher_is_better: bool
    batch_digest: str
    similarity: LayerSimilarity | None = None
    lens: LogitLens | None = None
    stages: StageSimilarity | None = None


GRANULARITIES = ("sublayers", "blocks")
RANKINGS = ("similarity", "measured")


def primary_metric(batch: Batch) -> tuple[str, bool]:
    if isinstance(batch, TextBatch):
        if batch.answer_mask is not None:
            return "accuracy", True
        return ("bits_per_byte", False) if batch.n_bytes else ("nll", False)
    return ("psnr_db", True) if batch.targets is not None else ("accuracy", True)


def is_stage_model(handle: ModelHandle, batch: Batch) -> bool:
    """True when the report compares stages (an image model on images), not layers."""
    return isinstance(batch, ImageBatch) and handle.kind != "causal-lm"


# The parts of a report, each computed from what it depends on, so a view can cache
# each by its own inputs: the hooked pass and the drop sweep do not depend on `skip`
# (they use every position); the statistics and the lens average over the positions
# from `skip` on, and are cheap to redo from the recorded pass.


def residual_pass(handle: ModelHandle, batch: TextBatch, progress: Progress | None = None) -> Residuals:
    """The one hooked pass every LM part reads: h_0..h_L and m_l at every position
    (skip 0); the logits are read out of h_L where needed (`final_logits`), never kept with
    it. `at_skip` views it at any skip without rerunning. `progress`: block by block."""
    return redundancy.collect_residuals(handle, batch, skip=0, with_logits=False, progress=progress)


def at_skip(handle: ModelHandle, batch: TextBatch, res: Residuals, skip: int) -> Residuals:
    """`res` (recorded on `batch`) with its statistics starting at position `skip`."""
    redundancy.check_depths(handle, batch, skip)
    if res.batch_digest != batch.digest:
        raise redundancy.RedundancyError("These residuals were recorded on another batch; record them on this one.")
    return replace(res, skip=skip)


def layer_statistics(handle: ModelHandle, batch: TextBatch, res: Residuals, skip: int) -> LayerSimilarity:
    """Module similarities, angular distance, CKA and norms over positions `skip` onward."""
    return redundancy.layer_similarity(at_skip(handle, batch, res, skip))


def lens_statistics(handle: ModelHandle, batch: TextBatch, res: Residuals, skip: int,
                    progress: Progress | None = None, so_far: dict | None = None) -> LogitLens:
    """The logit lens averaged over positions `skip` onward (`so_far`: see `logit_lens`)."""
    return logit_lens(handle, at_skip(handle, batch, res, skip), progress=progress, so_far=so_far)


def drop_sweep(handle: ModelHandle, batch: Batch, res: Residuals | None = None,
               progress: Progress | None = None, so_far: dict | None = None) -> DropSweep:
    """Every single drop, measured: LM parts from the recorded pass `res` (needed for
    an LM; `so_far`: what an interrupted sweep measured, see `lm_drop_sweep`), or image
    stages (each a full forward)."""
    if is_stage_model(handle, batch):
        return layer_drop.stage_drop_sweep(handle, batch)
    if res is None:
        raise redundancy.RedundancyError("A language model's drop sweep reuses its recorded pass: pass `res`.")
    return layer_drop.lm_drop_sweep(handle, batch, res, progress=progress, so_far=so_far)


def assemble(batch: Batch, sweep: DropSweep, similarity: LayerSimilarity | None = None,
             lens: LogitLens | None = None, stages: StageSimilarity | None = None) -> RedundancyReport:
    """A report from its parts, all measured on `batch`."""
    metric, up = primary_metric(batch)
    return RedundancyReport(sweep, metric, up, batch.digest, similarity=similarity, lens=lens, stages=stages)


def build_report(handle: ModelHandle, batch: Batch, skip: int = redundancy.DEFAULT_SKIP,
                 progress: Progress | None = None) -> RedundancyReport:
    """One hooked forward pass feeds the statistics, the lens and the drop sweep."""
    check_batch(handle, batch)
    step = progress or (lambda f, m: None)
    if is_stage_model(handle, batch):
        step(0.1, "stage similarity")
        stages = redundancy.stage_similarity(handle, batch)
        step(0.5, "dropping stages")
        return assemble(batch, drop_sweep(handle, batch), stages=stages)
    redundancy.check_depths(handle, batch, skip)  # a bad skip is refused before the pass
    res = residual_pass(handle, batch, progress=lambda f, m: step(0.05 * f, f"one forward pass with hooks, {m}"))
    sim = layer_statistics(handle, batch, res, skip)
    lens = lens_statistics(handle, batch, res, skip, progress=lambda f, m: step(0.05 + 0.25 * f, f"logit lens, {m}"))
    sweep = drop_sweep(handle, batch, res, progress=lambda f, m: step(0.3 + 0.7 * f, m))
    return assemble(batch, sweep, similarity=sim, lens=lens)


def cost(report: RedundancyReport, module: Drop) -> float:
    """Single-drop change of the metric, signed so that positive means worse."""
    delta = report.sweep.delta(module, report.metric)
    return -delta if report.higher_is_better else delta


def candidates(report: RedundancyReport, granularity: str, by: str) -> list[Drop]:
    """Droppable parts, least important first.

    granularity: "sublayers" (attention + MLP ranked jointly) or "blocks" (LMs; image
    models have stages only); by: "similarity" (1 - cos, LLM-Drop / ShortGPT) or
    "measured" (single-drop cost).
    """
    require_type(report, RedundancyReport, "The report")
    if granularity not in GRANULARITIES:
        raise redundancy.RedundancyError(f"Granularity is one of {', '.join(GRANULARITIES)}, not {granularity!r}.")
    if by not in RANKINGS:
        raise redundancy.RedundancyError(f"Rank by one of {', '.join(RANKINGS)}, not {by!r}.")
    if report.similarity is None:
        drops = list(report.sweep.dropped)
        if by == "similarity" and report.stages is not None:
            return sorted(drops, key=lambda m: -report.stages.similarity.get(m.layer, -1.0))
        return sorted(drops, key=lambda m: cost(report, m))
    if granularity == "blocks":
        score = {Drop("block", l): float(1 - report.similarity.block[l]) for l in range(report.similarity.n_layers)}
    else:
        score = {Drop(k, l): s for k, l, s in report.similarity.joint_ranking()}
    drops = [m for m in score if m in report.sweep.dropped]  # e.g. no MLPs in an attention-only model
    key = (lambda m: score[m]) if by == "similarity" else (lambda m: cost(report, m))
    return sorted(drops, key=key)


@dataclass(frozen=True)
class DropCheck:
    """Predicted (sum of single-drop changes) vs measured (dropped together) change."""

    modules: list[Drop]
    single: list[float]
    predicted: float
    measured: float
    together: Metrics


def check_drops(handle: ModelHandle, batch: Batch, report: RedundancyReport,
                modules: list[Drop], base_outputs: Logits | BaseOutputs | None = None,
                res: Residuals | None = None) -> DropCheck:
    """Drop `modules` together and compare with the sum of their single-drop costs.
    Duplicates count once. `base_outputs`: the unmodified model's outputs on `batch`
    (computed if not given); `res`: a language model's recorded pass on `batch`, from which
    only the blocks after the first dropped part run again (else a full forward)."""
    check_batch(handle, batch)
    if batch.digest != report.batch_digest:
        raise redundancy.RedundancyError("This report was measured on another evaluation batch; build the report "
                                         "on this batch (or check the drops on the report's batch).")
    modules = list(dict.fromkeys(modules))
    if not modules:
        raise redundancy.RedundancyError("Choose at least one part to drop.")
    handle.check_parts(modules)
    unmeasured = [m.part for m in modules if m not in report.sweep.dropped]
    if unmeasured:
        raise redundancy.RedundancyError(f"The report has no single-drop measurement of {', '.join(unmeasured)}.")
    single = [report.sweep.delta(m, report.metric) for m in modules]
    if len(modules) == 1:  # one module dropped "together" is the sweep's own measurement of it
        together = report.sweep.dropped[modules[0]]
    else:
        if base_outputs is None:
            base_outputs = handle.forward(model_inputs(batch))
        if res is not None and not is_stage_model(handle, batch):
            together = layer_drop.lm_dropped_together(handle, batch, res, modules, base_outputs)
        else:
            together = layer_drop.evaluate_dropped(handle, batch, modules, base_outputs)
    measured = getattr(together, report.metric) - getattr(report.sweep.base, report.metric)
    return DropCheck(modules, single, sum(single), measured, together)


# ----------------------------------------------------------------------- sentences


def _name(m: Drop) -> str:
    return {"attention": "attention", "mlp": "MLP", "block": "block", "stage": "stage"}[m.kind] + f" {m.layer}"


def similarity_sentence(sim: LayerSimilarity) -> str:
    imp = sim.importance()
    kind, layer, score = sim.joint_ranking()[0]
    half = sim.n_layers // 2
    att_deep, att_shallow = float(imp["attention"][half:].mean()), float(imp["attention"][:half].mean())
    where = "deeper" if att_deep < att_shallow else "shallower"
    means = f"attention {float(imp['attention'].mean()):.3g}" + (
        f", MLP {float(imp['mlp'].mean()):.3g}" if "mlp" in imp else " (the model has no MLPs)")
    parallel = (" In this model attention and MLP run in parallel (both read the block's input h and their "
                "writes are added): each sublayer is scored as 1 − cos(h, h + its own write), and dropping one "
                "keeps the other's write.") if sim.parallel else ""
    return (f"Least important sublayer: {_name(Drop(kind, layer))} (1 − cos = {score:.3g}). "
            f"Mean importance — {means}; the {where} half of the attention layers changes the "
            f"residual stream less ({min(att_deep, att_shallow):.3g} vs {max(att_deep, att_shallow):.3g})."
            + parallel)


def drop_sentence(report: RedundancyReport) -> str:
    ranked = sorted(report.sweep.dropped, key=lambda m: cost(report, m))
    if not ranked:
        return "No module of this model can be dropped on its own."
    metric, label = report.metric, LABELS[report.metric]
    cheap, dear = ranked[0], ranked[-1]

    def change(m: Drop) -> str:
        return metric_change(metric, report.sweep.delta(m, metric))

    base = f"Base {label}: {metric_value(metric, getattr(report.sweep.base, metric))}."
    if len(ranked) == 1:
        return f"Only {_name(cheap)} can be dropped: {label} {change(cheap)}. {base}"
    return (f"Cheapest single drop: {_name(cheap)} ({label} {change(cheap)}); most expensive: {_name(dear)} "
            f"({change(dear)}). {base}")


def cka_sentence(cka: torch.Tensor, labels: list[str] | None = None, unit: str = "depths") -> str:
    """One sentence on a CKA matrix [n, n] whose rows are `labels` (default: the depth numbers),
    named as `unit` ("depths" or "stages")."""
    labels = labels or [str(i) for i in range(cka.shape[0])]
    adjacent = torch.diagonal(cka, 1)
    low = int(adjacent.argmin())
    return (f"Adjacent {unit} have linear CKA {float(adjacent.mean()):.3f} on average (lowest "
            f"{float(adjacent.min()):.3f} between {unit} {labels[low]} and {labels[low + 1]}); "
            f"first vs last: {float(cka[0, -1]):.3f}.")


def not_droppable_sentences(sweep: DropSweep) -> list[str]:
    """Why some modules were not dropped: one sentence for all the image stages that change
    their input's shape, one line per other module."""
    reshaping = [m.layer for m, reason in sweep.not_droppable.items() if m.kind == "stage" and " maps shape " in reason]
    by_reason: dict[str, list[str]] = {}  # one line per reason ("mlp 0, mlp 1: the model has no MLP layers")
    for m, reason in sweep.not_droppable.items():
        if m.kind != "stage" or m.layer not in reshaping:
            by_reason.setdefault(reason, []).append(m.part)
    lines = [f"{', '.join(parts)}: {reason}" for reason, parts in by_reason.items()]
    if reshaping:
        names = ", ".join(map(str, reshaping[:-1])) + (" and " if len(reshaping) > 1 else "") + str(reshaping[-1])
        many = len(reshaping) > 1
        lines.insert(0, f"{'Stages' if many else 'Stage'} {names} {'change' if many else 'changes'} the shape of "
                        f"what flows through, so {'they' if many else 'it'} cannot be bypassed (the next stage "
                        f"would get the wrong shape) and {'have' if many else 'has'} no bar.")
    return lines


def lens_sentence(lens: LogitLens) -> str:
    agree = lens.agreement
    reached = [i for i, a in enumerate(agree.tolist()[:-1]) if a >= 0.5]  # the last depth is the output itself
    first = f"from depth {reached[0]} on" if reached else "only at the output (no earlier depth does)"
    return (f"Read out early, the model agrees with its final top-1 prediction on ≥ 50% of tokens "
            f"{first}; KL to the final distribution falls from {float(lens.kl[0]):.3g} nats at depth 0 "
            f"to {float(lens.kl[-2]):.3g} at depth {len(lens.kl) - 2}.")


def depth_sentence(sim: LayerSimilarity) -> str:
    growth = float(sim.norms[-1] / sim.norms[0].clamp_min(1e-12))
    biggest = int(sim.relative_update.argmax())
    return (f"The residual norm grows {growth:.2g}× from depth 0 to the output; the largest relative "
            f"update is block {biggest} ({float(sim.relative_update[biggest]):.3g}), the smallest block "
            f"{int(sim.relative_update.argmin())} ({float(sim.relative_update.min()):.3g}).")

