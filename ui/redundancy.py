"""The Redundancy view in parts, each cached by what it depends on: the hooked pass and the
drop sweep by the model alone, the statistics and the lens by model and skip (in the
no-copy `ui.store.STORE`, under a progress bar where they are computed), so changing skip
reruns only the statistics and the lens."""

from __future__ import annotations

import time

import streamlit as st

from analysis.compress.prune.pruning import Drop
from analysis.lens import LogitLens
from analysis.redundancy import report as rr
from analysis.redundancy.drops import LM_KINDS, DropSweep, stopped_sweep, sweep_in_forwards
from analysis.redundancy.report import DropCheck, RedundancyReport
from analysis.redundancy.similarity import LayerSimilarity, Residuals, StageSimilarity, final_logits, stage_similarity
from lib.handle import ModelHandle
from ui.cache import base_forward_seconds, base_outputs, batch_key, eval_batch, residuals_key
from ui.progress import (
    Progress,
    Stopped,
    counting_blocks,
    go_on,
    is_stopped,
    mark_stopped,
    partial,
    progress_bar,
    stored,
)
from ui.store import STORE

ESTIMATE_FROM_S = 10.0  # steps expected to take longer are announced with their estimate


def residuals(handle: ModelHandle) -> Residuals:
    """The hooked pass over the evaluation batch (every position): the base forward's own where
    it recorded them (`ui.cache.base_outputs`), else run here block by block under a bar with a
    Stop (a stopped pass keeps nothing: `ui.progress.Stopped` until going on, which runs it
    again); its time, one forward's, is kept for the estimates of the steps after it
    (`forward_seconds`, else the base forward's)."""
    def compute(step: Progress | None) -> Residuals:
        start = time.perf_counter()
        res = rr.residual_pass(handle, eval_batch(handle), progress=step)
        STORE.put(("forward_seconds", *batch_key(handle)), time.perf_counter() - start)
        return res

    return stored(residuals_key(handle), compute, "One forward pass with hooks",
                  stop="Nothing of a pass is kept: going on runs it again. Every part of this page reads it.")


def announce(handle: ModelHandle, forwards: float, what: str) -> None:
    """Say how long a step will take, from the measured forward, when that is over ESTIMATE_FROM_S."""
    seconds = STORE.get(("forward_seconds", *batch_key(handle))) or base_forward_seconds(handle)
    if seconds is not None and forwards * seconds > ESTIMATE_FROM_S:
        st.caption(f"{what}: about {forwards * seconds:.0f} s here, the work of {forwards:.0f} forward passes "
                   f"(one took {seconds:.1f} s on this machine); its bar shows the time left while it runs.")


def layer_statistics(handle: ModelHandle, skip: int) -> LayerSimilarity:
    batch = eval_batch(handle)
    return stored(("layer_statistics", *batch_key(handle), skip),
                  lambda _: rr.layer_statistics(handle, batch, residuals(handle), skip),
                  "Comparing every pair of depths", after=lambda: residuals(handle))


def lens(handle: ModelHandle, skip: int) -> LogitLens:
    """The logit lens; a stop keeps the token chunks read (`ui.progress.Stopped` until going on)."""
    batch = eval_batch(handle)
    key = ("lens", *batch_key(handle), skip)
    return stored(key, lambda step: rr.lens_statistics(handle, batch, residuals(handle), skip, progress=step,
                                                       so_far=partial(key)),
                  "Logit lens", stop="The tokens it has read are kept; going on reads the rest.")


def stage_statistics(handle: ModelHandle) -> StageSimilarity:
    return stored(("stage_statistics", *batch_key(handle)),
                   lambda _: stage_similarity(handle, eval_batch(handle)), "Comparing stages")


def drop_sweep(handle: ModelHandle) -> DropSweep:
    """Every single drop measured (LMs reuse the cached pass). While a sweep this visitor
    stopped is on hold (`stopped_notice`), what it measured, the rest listed as not measured
    (`Stopped` when it measured no module)."""
    batch = eval_batch(handle)
    key = ("drop_sweep", *batch_key(handle))
    if rr.is_stage_model(handle, batch):
        return stored(key, lambda _: rr.drop_sweep(handle, batch), "Dropping each stage")
    res = residuals(handle)
    if STORE.get(key) is not None:
        return STORE.get(key)
    so_far = partial(key)
    if is_stopped(key):  # what it measured is shown (its notice is `stopped_notice`'s)
        if so_far.get("dropped"):
            return stopped_sweep(handle, so_far)
        raise Stopped("Dropping each module")
    announce(handle, sweep_in_forwards(handle, batch.tokens.shape[1]) * (1 - _share_done(handle, so_far)),
             "Measuring every drop")
    with progress_bar("Dropping each module", lambda: mark_stopped(key)) as step:
        value = rr.drop_sweep(handle, batch, res, progress=step, so_far=so_far)
        STORE.put(key, value)
    return value


def stopped_notice(handle: ModelHandle) -> None:
    """Where the drop sweep's results go: that this visitor stopped it, how far it got, and a
    button that measures the rest (the page draws this once, before the sweep's results)."""
    key = ("drop_sweep", *batch_key(handle))
    if not is_stopped(key):
        return
    if STORE.get(key) is not None:  # another visitor's sweep finished it meanwhile
        go_on(key)
        return
    done = len(partial(key).get("dropped", {}))
    with st.container():  # a block, as `ui.progress` draws its buttons (see its note)
        if done:
            st.info(f"The drop sweep was stopped after {done} of {_parts(handle)} modules: what follows shows "
                    "those, and lists the rest as not measured.")
        else:
            st.info("The drop sweep was stopped before it had measured any module.")
        st.button("Measure the rest" if done else "Measure every drop", key="redundancy_resume_sweep",
                  on_click=go_on, args=(key,), icon=":material/play_arrow:")  # it goes on where it stopped


def _parts(handle: ModelHandle) -> int:
    """Modules the sweep measures: every block, attention and MLP the model can drop alone."""
    return sum(not handle.drop_problem(Drop(kind, layer)) for kind in LM_KINDS
               for layer in range(handle.structure.n_layers))


def _share_done(handle: ModelHandle, so_far: dict) -> float:
    return len(so_far.get("dropped", {})) / max(1, _parts(handle))


def redundancy(handle: ModelHandle, skip: int) -> RedundancyReport:
    """The Redundancy view's report, assembled from the cached parts (any missing one is
    computed here; the page computes them one by one first, to draw each when ready). A
    lens this visitor stopped is left out."""
    batch = eval_batch(handle)
    if rr.is_stage_model(handle, batch):
        return rr.assemble(batch, drop_sweep(handle), stages=stage_statistics(handle))
    stopped = is_stopped(("lens", *batch_key(handle), skip))
    return rr.assemble(batch, drop_sweep(handle), similarity=layer_statistics(handle, skip),
                       lens=None if stopped else lens(handle, skip))


def drop_check(handle: ModelHandle, skip: int, drops: tuple) -> DropCheck:
    """Predicted vs measured change for dropping `drops` together. An LM's base outputs
    are the logits of the cached pass (no second base forward)."""
    batch = eval_batch(handle)

    def compute(step: Progress) -> DropCheck:
        report, stages = redundancy(handle, skip), rr.is_stage_model(handle, batch)
        base = base_outputs(handle) if stages else final_logits(handle, residuals(handle))
        res = None if stages else residuals(handle)
        with counting_blocks(handle, step):
            return rr.check_drops(handle, batch, report, list(drops), base, res)

    return stored(("drop_check", *batch_key(handle), skip, drops), compute, "Dropping them together",
                  stop="Nothing of it is kept: going on measures it again.")
