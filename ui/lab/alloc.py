"""The lab's methods that decide how much each layer loses (`analysis.compress.prune`:
allocation and factorize): rate-distortion allocation, evolutionary search, low-rank
factorisation, layer sharing. Each explains its choice with a figure before the edit is
added."""

from __future__ import annotations

import streamlit as st

from analysis.compress.edits import Edit
from analysis.compress.prune import allocation as alloc
from analysis.compress.prune import plots as plots_alloc
from analysis.compress.prune.factorize import LowRank, ShareLayers, break_even_rank, energy_rank, spectrum
from lib import data
from lib.errors import RecipeError
from lib.handle import ModelHandle
from lib.metrics import model_inputs
from ui.cache import batch_key, eval_batch
from ui.lab.methods import LM, LM_AND_IMAGES, live_layers, method, scope_controls, sparsity_slider
from ui.progress import progress_bar, stored
from ui.store import STORE

CALIBRATION_WINDOWS = 4  # rate-distortion curves and the search run on a few windows: L x K forwards


def _calibration(base: ModelHandle):
    """Inputs for the curves and the search's selection batch (small: each costs L x K forwards)."""
    batch = eval_batch(base)
    inputs = model_inputs(batch)
    if base.kind == "causal-lm":
        return inputs[:CALIBRATION_WINDOWS, :128]
    return inputs


def _curves(base: ModelHandle, n_levels: int) -> alloc.DistortionCurves:
    return stored(("distortion_curves", *batch_key(base), n_levels),
                  lambda update: alloc.distortion_curves(base, _calibration(base), n_levels, progress=update),
                  "Distortion curves", stop="Nothing of them is kept; going on measures them from the start.")


@method("Allocate sparsity by rate-distortion", LM_AND_IMAGES,
        "Prune each layer alone to 20 levels and measure how much the outputs change; then choose one level per "
        "layer so that the summed change is least while the global sparsity is met (dynamic programming).")
def rate_distortion(base: ModelHandle, edited: ModelHandle) -> Edit | None:
    sparsity = sparsity_slider("rd")
    if sparsity <= 0:
        return None
    if not st.toggle("Compute the distortion curves (one pass per layer and level)", key="lab_rd_go"):
        return None
    curves = _curves(base, 20)
    plan = alloc.allocate(curves, sparsity)
    flat = alloc.uniform(curves, plan.sparsity)  # the same realised sparsity, or the comparison is unfair
    st.plotly_chart(plots_alloc.distortion_curves(curves, plan), width="stretch")
    st.plotly_chart(plots_alloc.allocation_bars([plan, flat]), width="stretch")
    measured = STORE.get_or_compute(
        ("rd_measured", *batch_key(base), sparsity),
        lambda: [alloc.measured_distortion(base, _calibration(base), p) for p in (plan, flat)])
    st.dataframe({"allocation": ["rate-distortion (chosen)", "uniform"],
                  "predicted distortion (sum of the curves)": [f"{plan.predicted:.4g}", f"{flat.predicted:.4g}"],
                  "measured distortion (all layers pruned at once)": [f"{m:.4g}" for m in measured]},
                 hide_index=True)
    st.caption(f"Distortion: mean squared change of the outputs on the calibration batch. Both plans prune "
               f"{plan.sparsity:.2%} of the weights (uniform to within one weight per layer). Predicted adds up "
               "each layer's own curve; measured prunes every layer together, so the gap shows how much the layers "
               "interact. The metrics panel measures the real effect on the evaluation set once you add it.")
    return plan.edit()


@method("Search per-layer sparsity (evolutionary)", LM_AND_IMAGES,
        "Start from the rate-distortion plan and move sparsity between layers, keeping the budget: each "
        "generation keeps the move that lowers KL to the base most on fresh text, if it also wins on a fixed batch.")
def evolutionary(base: ModelHandle, edited: ModelHandle) -> Edit | None:
    sparsity = sparsity_slider("evo")
    generations = st.slider("Generations", 1, 30, 8, key="lab_evo_generations")
    if sparsity <= 0 or not st.toggle("Run the search", key="lab_evo_go"):
        st.session_state.pop("lab_evo_stopped", None)  # switched off: the next run starts afresh
        return None
    curves = _curves(base, 20)
    key = ("evolution", *batch_key(base), sparsity, generations)
    partial = key + ("so far",)
    search = STORE.get(key)
    # A click stops the running search (streamlit reruns at once); the rerun keeps its best so far.
    if search is None and st.button("Stop the search", key="lab_evo_stop", help="Keep the best plan found so far."):
        st.session_state["lab_evo_stopped"] = key
    if search is None and st.session_state.get("lab_evo_stopped") == key:
        search = STORE.get(partial)
        if search is None:
            st.info("The search was stopped before its first generation ended; switch it off and on to start again.")
            return None
        st.caption(f"Stopped after {len(search.curve) - 1} of {generations} generations: the best plan so far.")
    if search is None:
        inputs = _calibration(base)
        pool = model_inputs(data.default_batch(base))

        def fresh(g: int):
            step = max(1, len(pool) // 8)
            return pool[(g * step) % len(pool):][:CALIBRATION_WINDOWS, :128] if base.kind == "causal-lm" \
                else pool[g % 4::4]

        with progress_bar("Evolutionary search") as update:
            search = alloc.evolve(base, inputs, fresh, curves, sparsity, generations=generations, progress=update,
                                  on_generation=lambda so_far: STORE.put(partial, so_far))
        STORE.put(key, search)
    st.plotly_chart(plots_alloc.search_progress(search.curve), width="stretch")
    plan = search.allocation(curves)
    st.plotly_chart(plots_alloc.allocation_bars([plan, alloc.allocate(curves, sparsity)]), width="stretch")
    return plan.edit()


@method("Low-rank factorisation", LM_AND_IMAGES,
        "Replace each weight by its truncated SVD as two smaller linear maps; they only save parameters and time "
        "below the break-even rank out·in/(out+in).")
def low_rank(base: ModelHandle, edited: ModelHandle) -> Edit | None:
    scope, layers = scope_controls(base, edited, "lowrank")
    if scope == "layers" and not layers:
        return None
    by = st.radio("Choose the rank by", ["rank", "energy"], horizontal=True, key="lab_lowrank_by",
                  format_func={"rank": "a fixed rank", "energy": "kept spectral energy"}.get)
    try:
        spectra = spectrum(edited, scope, layers)
    except RecipeError:
        spectra = {}
    if not spectra:
        st.info("No fully connected layer is left in this scope to factorise.")
        return None
    name = st.selectbox("Show the spectrum of", list(spectra), key="lab_lowrank_show")
    weight = edited.linear_layers()[name]
    if by == "rank":
        full = min(min(edited.linear_layers()[n].shape) for n in spectra)
        rank = st.slider("Rank", 1, full, max(1, full // 4), key="lab_lowrank_rank")
        edit, cut = LowRank(rank=rank, scope=scope, layers=layers), rank
    else:
        energy = st.slider("Kept energy", 0.5, 1.0, 0.9, step=0.01, key="lab_lowrank_energy")
        edit, cut = LowRank(energy=energy, scope=scope, layers=layers), energy_rank(weight, energy)
    st.plotly_chart(plots_alloc.spectrum(spectra[name], name, cut), width="stretch")
    st.caption(f"{name} {tuple(weight.shape)}: break-even rank {break_even_rank(*weight.shape[:2]):.0f}.")
    return edit


@method("Share a block's weights", LM,
        "Block j reuses block i's weights plus a rank-r correction (the SVD of their difference); rank 0 is pure "
        "sharing. Shared weights are stored once.", available=lambda handle: handle.structure.n_layers >= 2)
def share_layers(base: ModelHandle, edited: ModelHandle) -> Edit | None:
    layers = live_layers(edited)
    source = st.selectbox("Reuse the weights of block", layers, key="lab_share_source")
    target = st.selectbox("in block", [l for l in layers if l != source], key="lab_share_target")
    rank = st.slider("Correction rank r", 0, base.structure.d_model, 0, key="lab_share_rank")
    return ShareLayers(source, target, rank) if target is not None else None


METHODS = (rate_distortion, evolutionary, low_rank, share_layers)  # in menu order
