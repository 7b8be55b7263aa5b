"""Guided scenarios for a class: a few steps on the app's own pages, each with one
sentence, the controls it sets for the class (and highlights), an optional change of the
lab's recipe made for them, and a check of what the class should see, computed from the
model in front of them by the same cached calls the page makes. `ui.tour` draws them.

    induction   find the induction circuit (zoo:induction-2l, Channels)
    drops       drop layers until it breaks (zoo:code-lm, Redundancy -> lab)
    quantize    quantize until it breaks (zoo:code-lm, lab: INT8 -> INT4 -> NF4 -> binary)
    cnn-map     what the CNN's linear map looks at (zoo:digits-cnn, Interpreter)
    exits       exit early (zoo:code-lm, lab: the exit curves)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import streamlit as st
import torch

from analysis.channels.circuits import head_label
from analysis.channels.heads import ROLE_THRESHOLDS, HeadEdit
from analysis.compress.exits import rule as exit_rule
from analysis.compress.lab import Lab
from analysis.compress.prune.pruning import Drop
from analysis.compress.quant.quantize import Quantize
from analysis.compress.recipe import Recipe
from analysis.metric_text import metric_value
from lib.handle import ModelHandle
from ui import channels, interpreter, redundancy
from ui.lab.exits import exit_pass_key
from ui.store import STORE

LAB, CHANNELS, REDUNDANCY, INTERPRETER = "views/lab.py", "views/channels.py", "views/redundancy.py", \
    "views/interpreter.py"


@dataclass(frozen=True)
class Check:
    """What the class should see: passed, and the sentence with the numbers."""

    passed: bool
    text: str


@dataclass(frozen=True)
class Step:
    """page: the views/ file; text: one sentence; presets: widget key -> value, set for the
    class before the page is drawn (and highlighted); recipe: the lab recipe's edits made
    for them (None: the recipe is left alone); check: what they should see."""

    page: str
    text: str
    check: Callable[[ModelHandle, Lab | None], Check]
    presets: Callable[[ModelHandle], dict[str, object]] = lambda handle: {}
    recipe: Callable[[ModelHandle], list] | None = None


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    spec: str
    steps: tuple[Step, ...] = field(default_factory=tuple)


def _recipe(lab: Lab, edits: list) -> Recipe:
    return Recipe(lab.base.fingerprint, list(edits), model=lab.base.spec)


def _point(lab: Lab, edits: list):
    """The lab's history entry of exactly `edits` (None if it was not tried)."""
    digest = _recipe(lab, edits).digest
    return next((p for p in lab.history if p.digest == digest), None)


# ---------------------------------------------------------------------- find the induction circuit


def _heads(handle: ModelHandle):
    roles = channels.head_roles(handle)
    return roles.best("previous_token"), roles.best("induction")


def _roles_check(handle: ModelHandle, lab: Lab | None) -> Check:
    (prev, p_score), (ind, i_score) = _heads(handle)
    passed = p_score >= ROLE_THRESHOLDS["previous_token"] and i_score >= ROLE_THRESHOLDS["induction"] \
        and prev[0] < ind[0]
    return Check(passed, f"The previous-token head is {head_label(prev)} (score {p_score:.2f}); the induction head "
                         f"is {head_label(ind)} (score {i_score:.2f}), in a later layer.")


def _k_pairs(handle: ModelHandle):
    return channels.composition(handle).strongest("K", 30)


def _composition_check(handle: ModelHandle, lab: Lab | None) -> Check:
    (prev, _), (ind, _) = _heads(handle)
    top = _k_pairs(handle)[0]
    return Check(top.writer == prev and top.reader == ind,
                 f"The strongest K-composition channel is {top.label}, {top.relative:.1f}× what random weights "
                 f"score: the induction head's keys read what {head_label(top.writer)} wrote.")


def _cut_check(handle: ModelHandle, lab: Lab | None) -> Check:
    pair = _k_pairs(handle)[0]
    prompt = st.session_state.get(f"channels_prompt_{handle.spec}", channels.example_prompt(handle))
    result = channels.intervention(handle, HeadEdit(*pair.writer, (), 0.0), pair.reader, prompt)
    before, after = getattr(result.before, result.metric), getattr(result.after, result.metric)
    return Check(after < before / 2, f"Cutting {head_label(pair.writer)} takes {result.metric} from "
                                     f"{metric_value(result.metric, before)} to {metric_value(result.metric, after)}.")


def _channel_presets(handle: ModelHandle) -> dict[str, object]:
    return {f"mode_{handle.spec}": "K", f"pair_{handle.spec}_K": 0}


def _cut_presets(handle: ModelHandle) -> dict[str, object]:
    return _channel_presets(handle) | {f"scope_{handle.spec}": "head", f"alpha_{handle.spec}": 0.0}


# ---------------------------------------------------------------------- drop layers until it breaks


def _block_costs(handle: ModelHandle) -> list[tuple[Drop, float]]:
    """Every droppable block and its measured cost in bits per byte, cheapest first."""
    sweep = redundancy.drop_sweep(handle)
    costs = [(d, sweep.delta(d, "bits_per_byte")) for d in sweep.dropped if d.kind == "block"]
    return sorted(costs, key=lambda pair: pair[1])


def _sweep_check(handle: ModelHandle, lab: Lab | None) -> Check:
    costs = _block_costs(handle)
    (cheap, low), (dear, high) = costs[0], costs[-1]
    return Check(low < high, f"Dropping block {cheap.layer} costs {low:+.3f} bits per byte, the least of any block; "
                             f"block {dear.layer} costs the most, {high:+.3f}.")


def _drops(n: int) -> Callable[[ModelHandle], list]:
    return lambda handle: [d for d, _ in _block_costs(handle)[:n]]


def _one_drop_check(handle: ModelHandle, lab: Lab | None) -> Check:
    (drop, cost), point = _block_costs(handle)[0], lab.current
    measured = point.metrics.bits_per_byte - lab.base_point.metrics.bits_per_byte
    flipped = float(point.scores.flipped.float().mean())
    return Check(abs(measured - cost) <= 1e-3 * max(1.0, abs(cost)),
                 f"With block {drop.layer} gone the lab measures {measured:+.3f} bits per byte, as the Redundancy "
                 f"page predicted ({cost:+.3f}); {flipped:.1%} of the next-token answers flipped.")


def _three_drops_check(handle: ModelHandle, lab: Lab | None) -> Check:
    one, three = _point(lab, _drops(1)(handle)), lab.current
    if one is None:
        return Check(False, "Take the previous step first: it measures one dropped block.")
    significant = three.spread.significant("bits_per_byte")
    return Check(three.metrics.kl_to_base > 2 * one.metrics.kl_to_base and bool(significant),
                 f"KL to the base goes from {one.metrics.kl_to_base:.3f} with one block dropped to "
                 f"{three.metrics.kl_to_base:.3f} with three; the bits-per-byte change is "
                 f"{'significant' if significant else 'not significant'} (its 95 % interval "
                 f"{'excludes' if significant else 'includes'} zero).")


# ---------------------------------------------------------------------- quantize until it breaks

QUANT_STEPS = ("int8", "int4", "nf4", "binary")


def _quant_check(fmt: str) -> Callable[[ModelHandle, Lab | None], Check]:
    def check(handle: ModelHandle, lab: Lab | None) -> Check:
        tried = [(f, _point(lab, [Quantize(f)])) for f in QUANT_STEPS[:QUANT_STEPS.index(fmt) + 1]]
        tried = [(f, p) for f, p in tried if p is not None]
        here = dict(tried).get(fmt)
        if here is None:
            return Check(False, f"The lab has not measured {fmt} yet.")
        kl = {f: p.metrics.kl_to_base for f, p in tried}
        if "int8" not in kl:
            return Check(False, "Take the INT8 step first: each step compares with the ones before it.")
        flipped = float(here.scores.flipped.float().mean())
        text = (f"{fmt.upper()}: KL to the base {kl[fmt]:.4f} nats, {flipped:.1%} of answers flipped; "
                + ", ".join(f"{f.upper()} {value:.4f}" for f, value in kl.items() if f != fmt))
        if fmt == "int8":
            return Check(flipped < 0.05, text + ". Eight bits barely move the model.")
        return Check(kl[fmt] >= max(kl["int8"], 0.0) and (fmt != "binary" or kl[fmt] == max(kl.values())), text + ".")

    return check


def _quant_recipe(fmt: str) -> Callable[[ModelHandle], list]:
    return lambda handle: [Quantize(fmt)]


# ---------------------------------------------------------------------- the CNN's linear map


def _image(handle: ModelHandle) -> int:
    return int(st.session_state.get(f"interpreter_image_{handle.spec}", 0))


def _exact_check(handle: ModelHandle, lab: Lab | None) -> Check:
    linear = interpreter.linear_map(handle, _image(handle))
    scale = float(linear.output.abs().max())
    return Check(linear.error <= 1e-6 * max(1.0, scale),
                 f"A·x0 + b reproduces the network's {linear.n_outputs} logits to {linear.error:.1e} (the largest "
                 f"logit is {scale:.3g}): on this image the network is exactly this linear map.")


def _votes_check(handle: ModelHandle, lab: Lab | None) -> Check:
    linear = interpreter.linear_map(handle, _image(handle))
    predicted = int(linear.output.argmax())
    votes = (linear.x0.flatten() * linear.matrix[predicted]).float()
    ink = (linear.x0.flatten() > linear.x0.flatten().mean()).float()
    positive = votes.clamp_min(0)
    share = float((positive * ink).sum() / positive.sum().clamp_min(1e-12))
    return Check(share > float(ink.mean()),
                 f"Class {predicted} wins; {share:.0%} of its positive votes sit on the digit's ink, which covers "
                 f"{float(ink.mean()):.0%} of the image: the map reads the strokes.")


def _another_image_check(handle: ModelHandle, lab: Lab | None) -> Check:
    first, other = interpreter.linear_map(handle, 0), interpreter.linear_map(handle, _image(handle))
    if _image(handle) == 0:
        return Check(False, "Pick another image with the slider.")
    change = float(torch.linalg.norm(other.matrix - first.matrix) / torch.linalg.norm(first.matrix))
    return Check(change > 0.01, f"Image {_image(handle)}'s map A differs from image 0's by {change:.0%} (relative "
                                "Frobenius norm): another input, another linear region, another map.")


# ---------------------------------------------------------------------- exit early


def _exit_check(handle: ModelHandle, lab: Lab | None) -> Check:
    found = STORE.get(exit_pass_key(handle, handle, "logit"))
    if found is None:
        return Check(False, "The exit curves appear once the Early exit method has recorded its pass.")
    stats, curves, best = found
    if best is None:
        return Check(False, "No exit saves compute at ≤ 1 % agreement loss on this model.")
    return Check(best.saved > 0,  # `best_exit` only offers exits within 1 % of the full model's agreement
                 f"Best exit: {exit_rule.CRITERION_LABELS.get(best.criterion, best.criterion)} at threshold "
                 f"{best.threshold:.3g} saves {best.saved:.1%} of the compute with {best.agreement:.1%} top-1 "
                 "agreement with the full model.")


def _best_exit(handle: ModelHandle) -> list:
    """The best exit the curves found (the first step computed them), as the recipe's one edit."""
    found = STORE.get(exit_pass_key(handle, handle, "logit"))
    best = None if found is None else found[2]
    return [] if best is None else [exit_rule.EarlyExit(best.criterion, best.threshold, best.lens)]


def _exit_recipe_check(handle: ModelHandle, lab: Lab | None) -> Check:
    found = STORE.get(exit_pass_key(handle, handle, "logit"))
    exits = lab.current.exits
    if found is None or found[2] is None or exits is None:
        return Check(False, "Take the previous step first: its curves choose the exit.")
    best, agreement = found[2], lab.current.metrics.agreement
    return Check(abs(exits.saved - best.saved) < 1e-6 and abs(agreement - best.agreement) < 1e-6,
                 f"In the recipe the exit saves {exits.saved:.1%} of the compute (mean exit layer "
                 f"{exits.mean_exit:.2f} of {exits.n_layers}) and agrees with the full model on {agreement:.1%} of "
                 "tokens, as its curve point said; latency does not fall, because the lab simulates exits.")


SCENARIOS: dict[str, Scenario] = {s.key: s for s in (
    Scenario("induction", "Find the induction circuit", "zoo:induction-2l", (
        Step(CHANNELS, "Each square of the role grid is one head: find the previous-token head and the induction "
                       "head.", _roles_check),
        Step(CHANNELS, "The induction head finds its target with its keys, which read what the previous-token head "
                       "wrote: K-composition, chosen for you below.", _composition_check, _channel_presets),
        Step(CHANNELS, "Cut the previous-token head (scale α = 0, set for you at the bottom of the page) and watch "
                       "the accuracy on the repeated half.", _cut_check, _cut_presets),
    )),
    Scenario("drops", "Drop layers until it breaks", "zoo:code-lm", (
        Step(REDUNDANCY, "The bars measure what dropping each block, attention or MLP costs in bits per byte.",
             _sweep_check),
        Step(LAB, "The lab drops the cheapest block: compare bits per byte with what Redundancy predicted, and look "
                  "at the flipped answers.", _one_drop_check, recipe=_drops(1)),
        Step(LAB, "Drop the next two cheapest blocks too: KL, the flipped answers and the lens show where it breaks.",
             _three_drops_check, recipe=_drops(3)),
    )),
    Scenario("quantize", "Quantize until it breaks", "zoo:code-lm", tuple(
        Step(LAB, text, _quant_check(fmt), recipe=_quant_recipe(fmt)) for fmt, text in (
            ("int8", "INT8: every weight on 255 levels per output channel. Watch the KL and the flipped answers."),
            ("int4", "INT4: 16 levels per group of 128 weights."),
            ("nf4", "NF4: 16 levels again, spaced for normally distributed weights."),
            ("binary", "Binary: one bit per weight, its sign times the mean |w|. This is where it breaks."))
    )),
    Scenario("cnn-map", "What the CNN's linear map looks at", "zoo:digits-cnn", (
        Step(INTERPRETER, "Freeze the ReLUs at this image: the network is exactly A·x + b; the reconstruction error "
                          "says how exactly.", _exact_check),
        Step(INTERPRETER, "The vote maps show each pixel's share of a class's logit: red pushes the class up.",
             _votes_check),
        Step(INTERPRETER, "Another image (chosen for you): another linear region, another map.", _another_image_check,
             lambda handle: {f"interpreter_image_{handle.spec}": 7}),
    )),
    Scenario("exits", "Exit early", "zoo:code-lm", (
        Step(LAB, "Early exit reads each depth through the logit lens and stops when a criterion is sure enough; "
                  "each curve trades compute for agreement with the full model.", _exit_check,
             lambda handle: {"lab_method": "Early exit"}, recipe=lambda handle: []),
        Step(LAB, "The lab adds that exit to the recipe: compute saved and agreement are measured on the "
                  "evaluation set.", _exit_recipe_check, recipe=_best_exit),
    )),
)}
