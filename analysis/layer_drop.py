"""What dropping layers really costs: measured by removing them.

A dropped module contributes nothing to the residual stream (its output, bias
included, is zero): dropping block l gives y_l = x_l, attention l gives m_l = x_l,
MLP l gives y_l = m_l. The single-module sweep reuses the residuals of one cached
pass, so layers before the dropped one are never recomputed (METHODS §1, measured
drop sensitivity); several modules are dropped together through hooks that are
always removed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from analysis.redundancy import Progress, RedundancyError, Residuals, final_logits
from lib.data import Batch, ImageBatch, TextBatch
from lib.handle import BridgeHandle, ModelHandle, TorchHandle
from lib.hooks import forward_hooks
from lib.metrics import BaseOutputs, Metrics, metrics_from_outputs, model_inputs, prepare_base

MODULE_KINDS = ("block", "attention", "mlp")


@dataclass(frozen=True)
class Module:
    """One droppable module: kind "block" | "attention" | "mlp" (LMs) or "stage" (CNNs),
    layer index (LMs) or stage name (CNNs)."""

    kind: str
    layer: int | str

    @property
    def label(self) -> str:
        return f"{self.kind} {self.layer}" if self.kind != "stage" else f"stage {self.layer}"


@dataclass(frozen=True)
class DropSweep:
    """Base metrics and the metrics with each single module dropped.

    dropped: module -> Metrics measured with only that module removed;
    not_droppable: module -> reason, for image stages that cannot be bypassed.
    """

    base: Metrics
    dropped: dict[Module, Metrics]
    not_droppable: dict[Module, str]

    def delta(self, module: Module, metric: str) -> float:
        return getattr(self.dropped[module], metric) - getattr(self.base, metric)


def _zero(tensor: torch.Tensor, hook=None) -> torch.Tensor:
    return torch.zeros_like(tensor)


def _hook_names(module: Module) -> list[str]:
    parts = {"block": ("attn_out", "mlp_out"), "attention": ("attn_out",), "mlp": ("mlp_out",)}
    if module.kind not in parts:
        raise RedundancyError(f"Unknown module kind {module.kind!r}; use one of {MODULE_KINDS}.")
    return [f"blocks.{module.layer}.hook_{p}" for p in parts[module.kind]]


def _check_modules(handle: ModelHandle, modules: Sequence[Module]) -> None:
    if isinstance(handle, BridgeHandle):
        L = handle.structure.n_layers
        for m in modules:
            if m.kind not in MODULE_KINDS or not isinstance(m.layer, int) or not 0 <= m.layer < L:
                raise RedundancyError(f"{m.label} is not a module of this {L}-layer model.")
        return
    for m in modules:
        reason = bypass_problem(handle, m.layer)
        if reason:
            raise RedundancyError(reason)


@contextmanager
def dropped(handle: ModelHandle, modules: Sequence[Module]) -> Iterator[None]:
    """Inside the block, `handle` runs with `modules` removed; hooks go on exit."""
    _check_modules(handle, modules)
    if isinstance(handle, BridgeHandle):
        hooks = [(name, _zero) for m in modules for name in _hook_names(m)]
        with handle.hooks(hooks):
            yield
        return
    pairs = [(handle.model.stages[m.layer], lambda mod, inp, out: inp[0]) for m in modules]
    with handle.lock, forward_hooks(pairs):
        yield


def _metrics(handle: ModelHandle, outputs: torch.Tensor, batch: Batch,
             base: torch.Tensor | BaseOutputs | None) -> Metrics:
    return metrics_from_outputs(outputs, batch, handle.n_params, handle.size_bits, base)


def evaluate_dropped(handle: ModelHandle, batch: Batch, modules: Sequence[Module],
                     base: torch.Tensor | BaseOutputs | None) -> Metrics:
    """Metrics with all `modules` dropped together (one full forward under hooks)."""
    with dropped(handle, modules):
        outputs = handle.forward(model_inputs(batch))
    return _metrics(handle, outputs, batch, base)


@torch.no_grad()
def _run_from(handle: BridgeHandle, start: int, resid: torch.Tensor) -> torch.Tensor:
    """Blocks start..L-1 on resid [batch, pos, d], then the readout: logits."""
    for layer in range(start, handle.structure.n_layers):
        resid = handle.run_block(layer, resid)
    return handle.readout(resid)


@torch.no_grad()
def lm_drop_sweep(handle: BridgeHandle, batch: TextBatch, res: Residuals,
                  kinds: Sequence[str] = MODULE_KINDS, progress: Progress | None = None) -> DropSweep:
    """Metrics with each single block / attention / MLP dropped, reusing the cached
    h_l and m_l: dropping module l only reruns layers l..L-1 (blocks: l+1..L-1)."""
    L = handle.structure.n_layers
    base_logits = final_logits(handle, res)
    reference = prepare_base(base_logits, batch)  # base softmax once, not once per drop
    base = _metrics(handle, base_logits, batch, reference)
    out: dict[Module, Metrics] = {}
    jobs = [(kind, layer) for kind in kinds for layer in range(L)]
    for i, (kind, layer) in enumerate(jobs):
        if kind == "block":
            logits = _run_from(handle, layer + 1, res.resid[layer])
        elif kind == "mlp":
            logits = _run_from(handle, layer + 1, res.mid[layer])
        else:
            with dropped(handle, [Module("attention", layer)]):
                after = handle.run_block(layer, res.resid[layer])
            logits = _run_from(handle, layer + 1, after)
        out[Module(kind, layer)] = _metrics(handle, logits, batch, reference)
        if progress:
            progress((i + 1) / len(jobs), f"dropping {kind} {layer}")
    return DropSweep(base, out, {})


@torch.no_grad()
def naive_lm_drop_sweep(handle: BridgeHandle, batch: TextBatch, kinds: Sequence[str] = MODULE_KINDS) -> DropSweep:
    """The same sweep by full reruns under hooks (the reference for tests and bench)."""
    base_logits = handle.forward(batch.tokens)
    reference = prepare_base(base_logits, batch)
    base = _metrics(handle, base_logits, batch, reference)
    out = {Module(k, l): evaluate_dropped(handle, batch, [Module(k, l)], reference)
           for k in kinds for l in range(handle.structure.n_layers)}
    return DropSweep(base, out, {})


def bypass_problem(handle: TorchHandle, stage: str) -> str | None:
    """Why an image-model stage cannot be replaced by the identity (None if it can)."""
    if stage not in handle.model.stages:
        return f"The model has no stage {stage!r}."
    shapes = stage_shapes(handle)
    before, after = shapes[stage]
    if before != after:
        return (f"Stage {stage} maps shape {before} to {after}, so it cannot be bypassed: "
                "removing it would break the next stage.")
    return None


def stage_shapes(handle: TorchHandle) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input and output shape (without batch) of every stage, from one probe image."""
    x = torch.zeros(1, 1, 8, 8)
    shapes = {}
    with torch.no_grad():
        for name, stage in handle.model.stages.items():
            y = stage(x)
            shapes[name] = (tuple(x.shape[1:]), tuple(y.shape[1:]))
            x = y
    return shapes


@torch.no_grad()
def stage_drop_sweep(handle: TorchHandle, batch: ImageBatch) -> DropSweep:
    """Metrics with each bypassable stage replaced by the identity."""
    base_out = handle.forward(batch.images)
    base = _metrics(handle, base_out, batch, base_out)
    out, skipped = {}, {}
    for name in handle.model.stages:
        module = Module("stage", name)
        reason = bypass_problem(handle, name)
        if reason:
            skipped[module] = reason
            continue
        out[module] = evaluate_dropped(handle, batch, [module], base_out)
    return DropSweep(base, out, skipped)
