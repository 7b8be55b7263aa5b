"""The compression lab's controls: one small function per edit family, registered with
`method`. Each draws its widgets and returns the edit they describe (or None while
nothing is chosen); the lab page offers every method whose kinds include the loaded
model's. A new edit family (quantization, early exits) adds one such function here and
nothing else:

    @method("Quantize weights", LM_AND_IMAGES, "Round weights to a coarse grid ...")
    def quantize(base, edited):
        return Quantize(st.selectbox("Format", FORMATS, key="lab_quant_format"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import streamlit as st

from analysis.compress.edits import Edit
from analysis.compress.prune.pruning import Drop, Magnitude, RemoveHeads, SkipLayers, Wanda, kept_layers, skip_count
from lib.handle import ModelHandle
from ui.glossary import GLOSSARY

LM = ("causal-lm",)
IMAGES = ("image-classifier", "image-to-image")
LM_AND_IMAGES = LM + IMAGES

Controls = Callable[[ModelHandle, ModelHandle], "Edit | tuple[Edit, ...] | None"]


@dataclass(frozen=True)
class Method:
    """An edit family as the lab offers it: `controls(base, edited)` draws its widgets and
    returns the edit (None while nothing is chosen; a tuple for a family whose choice is several
    recipe steps, such as a mixed-precision allocation); `edited` is the current edited model,
    so controls offer only what is still there (heads left, layers not removed)."""

    name: str
    kinds: tuple[str, ...]
    help: str
    controls: Controls
    available: Callable[[ModelHandle], bool]


METHODS: dict[str, Method] = {}


def method(name: str, kinds: tuple[str, ...], help: str,
           available: Callable[[ModelHandle], bool] = lambda handle: True) -> Callable[[Controls], Controls]:
    """Register the controls of one edit family for models of `kinds`."""

    def register(controls: Controls) -> Controls:
        METHODS[name] = Method(name, kinds, help, controls, available)
        return controls

    return register


def methods_for(handle: ModelHandle) -> list[Method]:
    return [m for m in METHODS.values() if handle.kind in m.kinds and m.available(handle)]


# ---------------------------------------------------------------------- shared widgets


def sparsity_slider(key: str) -> float:
    percent = st.slider("Sparsity (share of weights set to zero)", 0, 95, 50, step=5, format="%d%%",
                        key=f"lab_{key}_sparsity", help=GLOSSARY["sparsity"])
    return percent / 100


def live_layers(edited: ModelHandle) -> list[int]:
    """Blocks of an LM copy that are still there."""
    gone = set(edited.structure.removed)
    return [layer for layer in range(edited.structure.n_layers) if f"block {layer}" not in gone]


def live_stages(edited: ModelHandle) -> list[str]:
    """Stages of an image model that still hold a linear layer (conv or fully connected)."""
    return list(dict.fromkeys(str(edited.place(name)[0]) for name in edited.linear_layers()))


def scope_controls(base: ModelHandle, edited: ModelHandle, key: str) -> tuple[str, tuple]:
    """Which linear layers an unstructured edit acts on: (scope, chosen layers)."""
    if base.kind in LM:
        scopes = ["all", "attention"] + (["mlp"] if base.structure.d_mlp else []) + ["layers"]
        names = {"all": "all blocks", "attention": "attention only", "mlp": "MLP only", "layers": "chosen blocks"}
    else:
        scopes, names = ["all", "layers"], {"all": "all layers", "layers": "chosen stages"}
    scope = st.radio("Scope", scopes, format_func=names.get, horizontal=True, key=f"lab_{key}_scope")
    if scope != "layers":
        return scope, ()
    if base.kind in LM:
        chosen = st.multiselect("Blocks", live_layers(edited), key=f"lab_{key}_blocks")
    else:
        chosen = st.multiselect("Stages", live_stages(edited), key=f"lab_{key}_stages")
    return scope, tuple(chosen)


# ---------------------------------------------------------------------- edit families


@method("Magnitude pruning", LM_AND_IMAGES,
        "Set the weights with the smallest |w| to zero, in each layer or against one threshold for all layers "
        "in scope. Zeros are still stored: quality moves, size and latency do not.")
def magnitude(base: ModelHandle, edited: ModelHandle) -> Edit | None:
    sparsity = sparsity_slider("magnitude")
    scope, layers = scope_controls(base, edited, "magnitude")
    per = st.radio("Threshold", ["layer", "global"], horizontal=True, key="lab_magnitude_per",
                   format_func={"layer": "per layer", "global": "one global threshold"}.get)
    return Magnitude(sparsity, scope, layers, per) if scope != "layers" or layers else None


@method("Wanda pruning", LM_AND_IMAGES,
        "In each output row, set to zero the weights with the smallest |w| × input-activation norm (norms "
        "measured on the evaluation set): weights that see large inputs are kept.")
def wanda(base: ModelHandle, edited: ModelHandle) -> Edit | None:
    sparsity = sparsity_slider("wanda")
    scope, layers = scope_controls(base, edited, "wanda")
    return Wanda(sparsity, scope, layers) if scope != "layers" or layers else None


def _heads_layers(edited: ModelHandle) -> list[int]:
    gone = set(edited.structure.removed)
    return [layer for layer in live_layers(edited) if f"attention {layer}" not in gone]


@method("Remove attention heads", LM,
        "Cut heads out of one layer: their query, key and value rows and output columns go, so the layer "
        "really computes fewer heads (removing every head removes the attention sublayer).",
        available=lambda handle: handle.structure.n_heads > 0)
def remove_heads(base: ModelHandle, edited: ModelHandle) -> Edit | None:
    layers = _heads_layers(edited)
    if not layers:
        st.info("Every attention sublayer is already removed.")
        return None
    layer = st.selectbox("Layer", layers, key="lab_heads_layer")
    heads = st.multiselect(f"Heads of layer {layer} to remove", edited.heads_left(layer), key=f"lab_heads_{layer}")
    return RemoveHeads(layer, tuple(sorted(heads))) if heads else None


@method("Drop a block, attention or MLP", LM,
        "Remove a whole block, or only its attention or MLP sublayer (with the LayerNorm that fed it): it adds "
        "nothing to the residual stream any more, and its weights and compute are gone.")
def drop_part(base: ModelHandle, edited: ModelHandle) -> Edit | None:
    kinds = ["block", "attention"] + (["mlp"] if base.structure.d_mlp else [])
    kind = st.radio("Part", kinds, horizontal=True, key="lab_drop_kind",
                    format_func={"block": "whole block", "attention": "attention", "mlp": "MLP"}.get)
    options = [layer for layer in live_layers(edited) if edited.drop_problem(Drop(kind, layer)) is None]
    if not options:
        st.info(f"No {kind} is left to drop.")
        return None
    return Drop(kind, st.selectbox("Layer", options, key="lab_drop_layer"))


@method("Bypass a stage", IMAGES,
        "Replace a stage by its input: only stages whose input and output have the same shape can go.")
def drop_stage(base: ModelHandle, edited: ModelHandle) -> Edit | None:
    gone = set(edited.structure.removed)
    stages = [name for name, _ in edited.structure.stages
              if f"stage {name}" not in gone and edited.drop_problem(Drop("stage", name)) is None]
    if not stages:
        st.info("No stage left has the same input and output shape, so none can be bypassed.")
        return None
    return Drop("stage", st.selectbox("Stage", stages, key="lab_drop_stage"))


@method("Skip layers for a speed-up", LM,
        "Unified layer skipping: keep K = round(L / r) blocks, the first, the last and evenly spaced ones "
        "between them (the gaps differ by at most one block).",
        available=lambda handle: handle.structure.n_layers >= 3)
def skip_layers(base: ModelHandle, edited: ModelHandle) -> Edit | None:
    n = base.structure.n_layers
    # One rounded r for the caption and the edit, so both describe the same K.
    # from the first r that skips a block (on 3 blocks r = 1.1 or 1.2 keeps all three)
    low = next(r / 10 for r in range(11, int(n * 5) + 1) if skip_count(n, r / 10) < n)
    speedup = round(st.slider("Target speed-up r", low, n / 2, max(low, min(2.0, n / 2)), step=0.1, format="%.1fx",
                              key="lab_skip_speedup"), 2)
    k = skip_count(n, speedup)
    st.caption(f"Keeps blocks {', '.join(map(str, kept_layers(n, speedup)))} of 0..{n - 1}: "
               f"K = round({n} / {speedup:g}) = {k} blocks, a real speed-up of L / K = {n / k:.2f}x over the blocks.")
    return SkipLayers(speedup)


# The order of these imports is the order of the lab's method menu.
# isort: off
from ui import lab_alloc_controls  # noqa: E402, F401 - registers rate-distortion, search, low rank, sharing
from ui import lab_quant_controls  # noqa: E402, F401 - registers quantization
from ui import lab_exit_controls  # noqa: E402, F401 - registers early exits
# isort: on
