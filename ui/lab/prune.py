"""The lab's pruning methods (`analysis.compress.prune.pruning`): magnitude and Wanda
pruning, removing attention heads, dropping a block / attention / MLP, bypassing an image
model's stage, and skipping layers for a speed-up. Each function draws its widgets and
returns the edit they describe (None while nothing is chosen).
"""

from __future__ import annotations

import streamlit as st

from analysis.compress.edits import Edit
from analysis.compress.prune.pruning import Drop, Magnitude, RemoveHeads, SkipLayers, Wanda, kept_layers, skip_count
from lib.handle import ModelHandle
from ui.lab.methods import IMAGES, LM, LM_AND_IMAGES, live_layers, method, scope_controls, sparsity_slider


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
    groups = edited.heads.groups(layer)
    if all(len(g) == 1 for g in groups):
        heads = st.multiselect(f"Heads of layer {layer} to remove", edited.heads.left(layer), key=f"lab_heads_{layer}")
        return RemoveHeads(layer, tuple(sorted(heads))) if heads else None
    picked = st.multiselect(f"Head groups of layer {layer} to remove", range(len(groups)), key=f"lab_heads_{layer}",
                            format_func=lambda i: "heads " + ", ".join(map(str, groups[i])))
    st.caption("Grouped-query attention: the heads of a group share one key/value head, so they go together. "
               "To see what one head does, cut it on the Channels page.")
    return RemoveHeads(layer, tuple(sorted(h for i in picked for h in groups[i]))) if picked else None


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


METHODS = (magnitude, wanda, remove_heads, drop_part, drop_stage, skip_layers)  # in menu order
