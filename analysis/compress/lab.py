"""The compression lab: one base model, its evaluation batch, and every recipe tried on it.

A `Lab` keeps the current recipe, builds each edited model from the base (reusing the
edited copy of the longest recipe prefix it still holds, so changing the last edit
does not redo the ones before it), measures it against the base outputs (computed
once), and records every distinct recipe tried as a `LabPoint` in its history. Undo,
redo and reset move between exact recipe states: models are always rebuilt from the
base, so an undone recipe gives bit-identical weights.

    lab = Lab(handle)                       # evaluates the base once
    lab.add(Magnitude(0.5))                 # builds, evaluates, records
    lab.add(Drop("block", 3))               # reuses the magnitude-pruned copy
    lab.undo(); lab.current.metrics; lab.frontier("size_bits")
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import OrderedDict
from typing import Sequence

import torch

from analysis.compress import edits as edit_registry
from analysis.compress.edits import Edit, positions_of
from analysis.compress.exits import ExitPoint, exits_of
from analysis.compress.history import (
    LabPoint,
    LayerSummary,
    frontier,
    layer_summary,
    metric_deltas,
    point_row,
    quality_metric,
    recipe_digest,
    recipe_label,
    rows_csv,
)
from analysis.compress.recipe import Recipe, check_for
from lib import data
from lib.errors import RecipeError
from lib.handle import ModelHandle
from lib.latency import (
    LATENCY_REPEATS,
    LatencyChange,
    base_timing,
    compare_latency,
    count_flops,
    cut_positions,
    timed_outputs,
    timed_part,
)
from lib.metrics import Metrics, metrics_from_outputs, model_inputs
from lib.progress import Progress, stage
from lib.scoring import BaseOutputs, prepare_base, readout_blocks, told_of_windows
from lib.spread import Scores, position_scores, spread
from lib.storage import owned_bytes


class Lab:
    """Recipes tried on one base model (never mutated) and its evaluation batch.

    base_outputs: the base's outputs on `batch`, raw or prepared (pass shared ones to
    save a forward and the memory of a second copy). cache_size, cache_bytes: edited
    copies kept for prefix reuse, at most this many and (beyond the newest) this many bytes
    of weights of their own (a copy shares what no edit rewrote; one lab per session). latency_repeats: at least
    this many timed forwards of the base, and pairs of base and edited forwards for each
    recipe (`compare_latency`); 0: only the pass that gives the outputs is timed (large
    logits are read out later, as they are scored), and points carry no `latency`.
    progress(fraction, message): told as the base's measurement goes from step to step.
    forward_seconds: what the forward that gave `base_outputs` took in this process (the timing
    is sized from it; else one row of the batch paces it).
    """

    def __init__(self, base: ModelHandle, batch: data.Batch | None = None,
                 base_outputs: torch.Tensor | BaseOutputs | None = None, cache_size: int = 4,
                 latency_repeats: int = LATENCY_REPEATS, cache_bytes: int = 2 * 2**30,
                 progress: Progress | None = None, forward_seconds: float | None = None) -> None:
        if base.base_fingerprint is not None:
            raise RecipeError("A lab starts from a loaded base model, not from an edited copy.")
        if latency_repeats < 0 or cache_size < 1:
            raise RecipeError("A lab needs a number of timed forwards (0: time the one that gives the outputs) "
                              "and at least one cached copy.")
        self.base = base
        self.batch = batch if batch is not None else data.default_batch(base)
        data.check_batch(base, self.batch)
        self.cache_size, self.cache_bytes, self.latency_repeats = cache_size, cache_bytes, latency_repeats
        self._cache: OrderedDict[str, ModelHandle] = OrderedDict()
        self._lock = threading.RLock()  # the UI builds downloads on another thread
        inputs, tell = model_inputs(self.batch), progress or (lambda fraction, message: None)
        self._positions = positions_of(inputs)  # what an edit's calibration work is counted in
        prepared = base_outputs if isinstance(base_outputs, BaseOutputs) else None  # made below, where it is scored
        given = base_outputs.logits if prepared is not None else base_outputs
        tell(0.0, "its outputs")
        outputs, seconds = timed_outputs(base, inputs, given, latency_repeats, forward_seconds)  # given: not run
        latency, began = None, time.perf_counter()
        if latency_repeats:
            timing = base_timing(base, inputs, seconds, latency_repeats, stage(tell, 0.05, 0.55, "timing it: "),
                                 warm=forward_seconds is None)  # else no `forward` has run: `pace`'s did
            seconds = timing.median_ms / 1000 * inputs.shape[0] / timing.rows * (
                inputs.shape[1] / timing.positions if timing.positions else 1)
            # pairs of base and model forwards must fit the budget too: twice the forwards
            part = timed_part(inputs, seconds, 2 * latency_repeats)
            self._timed = (part.shape[0], cut_positions(part, inputs))  # rows, and positions where cut
            self._base_flops = count_flops(lambda: base.forward(part))  # what the FLOP prediction divides by
            latency = LatencyChange(timing, timing, 1.0, 1.0, 1.0, 1.0)
        # seconds the base's stages took: how a change's bar is shared out (`_measure`)
        self._seconds = {"forward": seconds, "timing": 2 * (time.perf_counter() - began)}  # pairs: twice the forwards
        began = time.perf_counter()
        with told_of_windows(lambda k, n: tell(0.6 + 0.4 * k / n, f"scoring it: window {k} of {n}")):
            self.reference = prepared if prepared is not None else prepare_base(outputs, self.batch)
            metrics, scores = self._metrics(base, outputs, latency.base.median_ms if latency else seconds * 1000)
        share = readout_blocks(base) / max(base.structure.n_layers + readout_blocks(base), 1)  # a forward's readout
        self._seconds["scoring"] = 2 * max(time.perf_counter() - began, seconds * share)  # a change's: both readouts
        self.history: list[LabPoint] = [self._point(0, (), metrics, latency=latency, scores=scores)]
        self._current = 0
        self._undo: list[tuple[Edit, ...]] = []
        self._redo: list[tuple[Edit, ...]] = []
        self._summaries: dict[str, LayerSummary] = {}

    # ------------------------------------------------------------------ state

    @property
    def current(self) -> LabPoint:
        return self.history[self._current]

    @property
    def base_point(self) -> LabPoint:
        return self.history[0]

    @property
    def recipe(self) -> Recipe:
        """The current recipe (a new object: changing it changes nothing here)."""
        return self._recipe(self.current.edits)

    @property
    def quality(self) -> str:
        return quality_metric(self.base_point.metrics)

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def _recipe(self, edits: Sequence[Edit]) -> Recipe:
        return Recipe(self.base.fingerprint, list(edits), model=self.base.spec)

    # ------------------------------------------------------------------ changing the recipe

    def apply(self, recipe: Recipe, progress: Progress | None = None) -> LabPoint:
        """Make `recipe` current: build and evaluate it (unless it was tried before) and
        record it. A recipe for another model, or an edit that does not fit, raises
        RecipeError and leaves the lab as it was."""
        check_for(recipe, self.base)
        with self._lock:
            before = self.current.edits
            point = self._go(tuple(recipe.edits), progress)
            if point.edits != before:
                self._undo.append(before)
                self._redo.clear()
            return point

    def add(self, edit: Edit, progress: Progress | None = None) -> LabPoint:
        recipe = self.recipe
        if not recipe.add(edit):
            raise RecipeError(f"'{edit.label}' is already in the recipe.")
        return self.apply(recipe, progress)

    def replace(self, index: int, edit: Edit, progress: Progress | None = None) -> LabPoint:
        """Put `edit` in place of edit number `index` (the edits before it are reused)."""
        recipe = self.recipe
        recipe.remove(index)
        recipe.edits.insert(index, edit)
        return self.apply(recipe, progress)

    def remove(self, index: int, progress: Progress | None = None) -> LabPoint:
        recipe = self.recipe
        recipe.remove(index)
        return self.apply(recipe, progress)

    def move(self, index: int, to: int, progress: Progress | None = None) -> LabPoint:
        recipe = self.recipe
        recipe.move(index, to)
        return self.apply(recipe, progress)

    def restore(self, step: int, progress: Progress | None = None) -> LabPoint:
        """Make the recipe of history entry `step` current again."""
        if not 0 <= step < len(self.history):
            raise RecipeError(f"The history has entries 0..{len(self.history) - 1}; there is no entry {step}.")
        return self.apply(self._recipe(self.history[step].edits), progress)

    def reset(self, progress: Progress | None = None) -> LabPoint:
        """Back to the base model (an undoable step, like any other change)."""
        return self.apply(self._recipe(()), progress)

    def undo(self, progress: Progress | None = None) -> LabPoint:
        """Restore the recipe that was current before the last change."""
        with self._lock:
            if not self._undo:
                raise RecipeError("There is nothing to undo.")
            before = self.current.edits
            point = self._go(self._undo[-1], progress)
            self._undo.pop()
            self._redo.append(before)
            return point

    def redo(self, progress: Progress | None = None) -> LabPoint:
        """Restore the recipe the last undo left."""
        with self._lock:
            if not self._redo:
                raise RecipeError("There is nothing to redo.")
            before = self.current.edits
            point = self._go(self._redo[-1], progress)
            self._redo.pop()
            self._undo.append(before)
            return point

    def _go(self, edits: tuple[Edit, ...], progress: Progress | None) -> LabPoint:
        """Make `edits` current, evaluating them unless the history has them already."""
        digest = recipe_digest(edits)
        point = next((p for p in self.history if p.digest == digest), None)
        if point is None:
            at = self._apply_share(edits)  # of the bar up to `end`: an exit rule adds a recorded pass at the end
            model = self._model(edits, stage(progress, 0.0, 0.9 * at))
            end = 1.0 if model.exit_rule is None else 0.9
            metrics, latency, scores = self._measure(edits, stage(progress, 0.0, end), at)
            if progress and model.exit_rule is not None:
                progress(0.9, "recording where the predictions exit")
            exits = exits_of(model, self.batch)
            point = self._point(len(self.history), edits, metrics, exits, latency, scores)
            self.history.append(point)
        self._current = point.step
        return point

    # ------------------------------------------------------------------ models

    def edited(self, progress: Progress | None = None) -> ModelHandle:
        """The current edited model (the base itself for an empty recipe: read it, never
        edit it). Rebuilt from the base if it has left the cache."""
        return self.model_for(self.current.edits, progress)

    def model_for(self, edits: Sequence[Edit], progress: Progress | None = None) -> ModelHandle:
        """The base with `edits` applied in order, through the prefix cache."""
        with self._lock:
            return self._model(tuple(edits), progress)

    def clear_cache(self) -> None:
        """Forget every edited copy (the next model is rebuilt from the base)."""
        with self._lock:
            self._cache.clear()

    def _model(self, edits: tuple[Edit, ...], progress: Progress | None) -> ModelHandle:
        start, done = self._cached_prefix(edits)
        if done == len(edits):
            return start
        if progress:
            progress(0.0, "copying the " + ("base model" if done == 0 else f"model with {done} edit(s) applied"))
        model = start.private_copy()
        todo = edits[done:]  # each with a part of the bar by its work: a calibrating edit's forwards outweigh the rest
        work = [0.1 + e.calibration_forwards(self.base, self._positions) for e in todo]
        work = list(itertools.accumulate(work, initial=0.0))
        for i, edit in enumerate(todo):
            tell = stage(progress, 0.05 + 0.95 * work[i] / work[-1], 0.05 + 0.95 * work[i + 1] / work[-1],
                         f"applying {edit.label}")
            if tell:
                tell(0.0, "")
            edit_registry.apply_(model, edit, stage(tell, 0.0, 1.0, ": "))
        self._cache[recipe_digest(edits)] = model
        while len(self._cache) > 1 and (len(self._cache) > self.cache_size or self._cached_bytes() > self.cache_bytes):
            self._cache.popitem(last=False)
        return model

    def _cached_prefix(self, edits: tuple[Edit, ...]) -> tuple[ModelHandle, int]:
        """The model with the longest prefix of `edits` still cached, and that prefix's length."""
        for k in range(len(edits), 0, -1):
            key = recipe_digest(edits[:k])
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key], k
        return self.base, 0

    def _apply_share(self, edits: Sequence[Edit]) -> float:
        """The part of a change's bar that applying the edits not cached yet takes: 5 % for
        edits that only rewrite weights, else their calibration forwards' share of the seconds."""
        spent, todo = self._seconds, edits[self._cached_prefix(tuple(edits))[1]:]
        applying = sum(e.calibration_forwards(self.base, self._positions) for e in todo) * spent["forward"]
        return max(0.05, applying / (applying + sum(spent.values())))

    def _cached_bytes(self) -> int:
        return sum(owned_bytes(iter(m.weights().values())) for m in self._cache.values())

    # ------------------------------------------------------------------ measuring

    def evaluate(self, edits: Sequence[Edit], progress: Progress | None = None) -> Metrics:
        """Build the base with `edits` (through the prefix cache) and measure it against the
        base outputs, without recording anything."""
        return self._measure(edits, progress)[0]

    def _measure(self, edits: Sequence[Edit], progress: Progress | None, at: float | None = None
                 ) -> tuple[Metrics, LatencyChange | None, Scores]:
        """Metrics of the base with `edits`, and its latency timed against the base's in
        alternating pairs (a copy's first forward also builds its fast path, so the one that
        gives the outputs is not among them), with the FLOP prediction beside it."""
        # the bar: applying the edits first (`at`, `_apply_share`), the rest by what each stage took on the base
        spent, at = self._seconds, self._apply_share(edits) if at is None else at
        share = {k: (1 - at) * v / sum(spent.values()) for k, v in spent.items()}
        with self._lock:
            model = self._model(tuple(edits), stage(progress, 0.0, at))
            tell = stage(progress, at, at + share["forward"], "measuring: ")
            inputs = model_inputs(self.batch)
            start = time.perf_counter()
            with model.told_of_blocks(lambda k, n: tell and tell(k / n, f"{k} of {n} blocks")):
                outputs = model.outputs(inputs)
            latency_ms = (time.perf_counter() - start) * 1000
            latency, at = None, at + share["forward"]
            if self.latency_repeats:
                latency = self._against_base(model, stage(progress, at, at + share["timing"], "timing it against the "
                                                                                               "base: "))
                latency_ms, at = latency.model.median_ms, at + share["timing"]
            tell = stage(progress, at, 1.0, "scoring: ")
            with told_of_windows(lambda k, n: tell and tell(k / n, f"window {k} of {n}")):
                metrics, scores = self._metrics(model, outputs, latency_ms)
            return metrics, latency, scores

    def _against_base(self, model: ModelHandle, progress: Progress | None = None) -> LatencyChange:
        """`model` timed against the base in alternating pairs (both have run once on the
        whole batch), with the FLOP prediction."""
        inputs = model_inputs(self.batch)
        rows, positions = self._timed
        part = inputs[:rows, :positions] if positions else inputs[:rows]
        if part.shape != inputs.shape:
            self.base.forward(part), model.forward(part)  # a new shape: first forwards untimed
        predicted = count_flops(lambda: model.forward(part)) / max(self._base_flops, 1)
        return compare_latency(lambda: self.base.forward(part), lambda: model.forward(part),
                               self.latency_repeats, rows, predicted, progress=progress, positions=positions)

    def time_again(self, progress: Progress | None = None) -> LabPoint:
        """Time the current recipe against the base once more (a timing taken while the
        machine was busy can be too noisy to tell); the point keeps every other number."""
        if not self.latency_repeats or not self.current.edits:
            raise RecipeError("Only an edited model in a lab that times latency can be timed against the base.")
        with self._lock:
            point = self.current
            model = self._model(point.edits, stage(progress, 0.0, 0.1))
            latency = self._against_base(model, stage(progress, 0.1, 1.0, "timing the model against the base: "))
            metrics = dataclasses.replace(point.metrics, latency_ms=latency.model.median_ms)
            self.history[point.step] = dataclasses.replace(point, metrics=metrics, latency=latency)
            return self.history[point.step]

    def _metrics(self, model: ModelHandle, outputs: torch.Tensor, latency_ms: float) -> tuple[Metrics, Scores]:
        """The metrics of `outputs` against the base, and their per-position scores."""
        per_row: dict[str, torch.Tensor] = {}  # the scoring pass's per-position numbers: scored once
        metrics = metrics_from_outputs(outputs, self.batch, model.n_params, model.size_bits, self.reference,
                                       latency_ms, per_row)
        return metrics, position_scores(outputs, self.batch, self.reference, per_row or None)

    def _point(self, step: int, edits: tuple[Edit, ...], metrics: Metrics, exits: ExitPoint | None = None,
               latency: LatencyChange | None = None, scores: Scores | None = None) -> LabPoint:
        """A history entry; with `scores`, its intervals (paired against the base's scores)."""
        base = scores if step == 0 else self.base_point.scores
        return LabPoint(step, edits, recipe_digest(edits), recipe_label(edits), self._recipe(edits).to_json(),
                        metrics, exits, latency, scores, None if scores is None else spread(scores, base))

    def deltas(self, point: LabPoint | None = None) -> dict[str, float]:
        """Each metric of `point` (default: the current one) minus the base's."""
        return metric_deltas((point or self.current).metrics, self.base_point.metrics)

    # ------------------------------------------------------------------ history

    def rows(self) -> list[dict[str, object]]:
        """The history as table rows: step, label, metrics, shares kept, early exits (mean
        exit layer, compute saved with and without the skipped layers' keys and values
        charged; None without an exit step), the recipe."""
        return [point_row(p, self.base_point.metrics, p.step == self._current) for p in self.history]

    def history_csv(self) -> str:
        """The history as CSV text: one row per recipe tried (`rows`)."""
        return rows_csv(self.rows())

    def frontier(self, cost: str = "size_bits", quality: str | None = None) -> list[int]:
        """History steps on the Pareto frontier of `cost` ("size_bits" or "latency_ms", lower is
        better; latency relative to the base) against `quality` (default: the base's `quality_metric`)."""
        return frontier(self.history, cost, quality or self.quality)

    # ------------------------------------------------------------------ per layer

    def layer_summary(self) -> LayerSummary:
        """Sparsity, kept weights and heads per layer of the current edited model (counted
        once per recipe: a page redraws it on every rerun)."""
        digest = self.current.digest
        if digest not in self._summaries:
            self._summaries[digest] = layer_summary(self.base, self.edited())
        return self._summaries[digest]

