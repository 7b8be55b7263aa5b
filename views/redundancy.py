"""Redundancy page: which layers barely matter, and what dropping them really costs."""

import streamlit as st

from analysis.compress.prune.pruning import Drop
from analysis.metric_text import metric_change
from analysis.redundancy import plots
from analysis.redundancy import report as rr
from analysis.redundancy.similarity import DEFAULT_SKIP
from lib.handle import ModelHandle
from lib.metrics import LABELS
from ui.glossary import GLOSSARY
from ui.progress import Stopped
from ui.redundancy import drop_check, layer_statistics, lens, redundancy, stage_statistics, stopped_notice
from ui.session import change_recipe, require_handle, session_lab


def add_to_recipe(handle: ModelHandle, modules: list[Drop]) -> None:
    """A button that adds the drops of `modules` to this session's compression recipe (the
    lab applies and measures them at once; an edit that does not fit is refused here)."""
    if st.button("Add this drop to the compression recipe" if len(modules) == 1 else
                 f"Add these {len(modules)} drops to the compression recipe", type="primary"):
        try:
            lab = session_lab(handle)
        except Stopped:  # the base's measurement was stopped: its notice is drawn here
            return
        wanted = lab.recipe
        added = sum(wanted.add(m) for m in modules)
        if change_recipe(f"Adding {added} drop(s) to the recipe", lambda p: lab.apply(wanted, p)):
            st.success(f"Added {added} drop(s); the recipe now has {len(lab.recipe.edits)} edit(s).")


handle = require_handle()
st.title("Layer redundancy")
if handle.kind == "causal-lm":
    st.caption("How much each layer changes what flows through the model, how alike layers are, what "
               "each depth would predict, and what removing layers really costs on the evaluation set.")
else:  # an image model has stages, and no readout per depth
    st.caption("How much each stage changes what flows through the model, how alike the stages are, and what "
               "bypassing a stage really costs on the evaluation set.")

skip = 0
if handle.kind == "causal-lm":
    skip = st.number_input("Skip the first positions of each window", 0, 32, DEFAULT_SKIP,
                           help="BOS and the first positions carry huge-norm 'sink' activations that dominate "
                                "every similarity. " + GLOSSARY["attention_sink"])
# Each part is cached by what it depends on and drawn as soon as it is ready: the
# statistics and the lens (cheap, depend on skip) first, the drop sweep (the model only) last.
sim = None
if handle.kind == "causal-lm":
    try:
        sim = layer_statistics(handle, int(skip))
    except Stopped:  # the hooked pass was stopped (its notice is drawn): every part below reads it
        st.stop()
    st.subheader("How much each layer changes the residual stream",
                 help=GLOSSARY["residual_stream"] + " " + GLOSSARY["one_minus_cos"])
    st.plotly_chart(plots.importance_bars(sim), width="stretch")
    st.caption("Low bars = the module's output is almost its input (cosine near 1): a candidate to "
               f"drop. {rr.similarity_sentence(sim)}")
    st.subheader("How alike the layers are", help=GLOSSARY["cka"] + " " + GLOSSARY["angular_distance"])
    left, right = st.columns(2)
    depths = [str(d) for d in range(sim.cka.shape[0])]
    left.plotly_chart(plots.cka_heatmap(sim.cka, depths, "depth"), width="stretch")
    right.plotly_chart(plots.angular_heatmap(sim.angular), width="stretch")
    st.caption("Depth d is the residual stream entering block d (the last is the output). CKA 1 = same "
               "representation up to rotation and scale. " + rr.cka_sentence(sim.cka) + " Angular "
               "distance 0 = same direction at the last token; a dark run along a row marks layers "
               "that could be skipped together.")
    st.subheader("Depth effect", help=GLOSSARY["relative_update"])
    st.plotly_chart(plots.depth_lines(sim), width="stretch")
    st.caption(rr.depth_sentence(sim))
    st.subheader("Logit lens: what each depth would predict",
                 help=GLOSSARY["logit_lens"] + " " + GLOSSARY["kl"])
    try:
        logit_lens = lens(handle, int(skip))
        st.plotly_chart(plots.lens_lines(logit_lens), width="stretch")
        st.caption("Each depth is read out through the final LayerNorm (recomputed on it) and the "
                   "unembedding. " + rr.lens_sentence(logit_lens),
                   help=GLOSSARY["layernorm"] + " " + GLOSSARY["unembedding"])
    except Stopped:  # its notice is drawn; the drop sweep below does not need it
        pass
else:
    stages = stage_statistics(handle)
    if stages.similarity:
        st.subheader("How much each stage changes its input", help=GLOSSARY["stage"] + " " + GLOSSARY["one_minus_cos"])
        st.plotly_chart(plots.stage_importance_bars(stages), width="stretch")
        st.caption("Only stages whose input and output have the same shape can be compared (and bypassed). "
                   "Low bars = the stage's output is almost its input.")
    st.subheader("How alike the stages are", help=GLOSSARY["cka"])
    st.plotly_chart(plots.cka_heatmap(stages.cka, stages.names, "stage"), width="stretch")
    st.caption("CKA over images, each stage's output flattened. "
               + rr.cka_sentence(stages.cka, list(stages.names), "stages"))

st.subheader("What dropping one module really costs", help=GLOSSARY["drop"])
stopped_notice(handle)
try:
    report = redundancy(handle, int(skip))  # the parts above plus the sweep, under its progress bar here
except Stopped:  # the sweep was stopped before it measured a module: nothing below has anything to show
    st.stop()
label = LABELS[report.metric]
st.plotly_chart(plots.drop_cost_bars(report.sweep, report.metric, label), width="stretch")
has_kl = all(m.kl_to_base is not None for m in report.sweep.dropped.values())
st.caption(f"Each bar removes one module and re-measures {label}" + (" (hover for KL to the base). " if has_kl
           else ". ") + rr.drop_sentence(report), help=GLOSSARY["kl"] if has_kl else None)
for line in rr.not_droppable_sentences(report.sweep):
    st.caption(line)

droppable = list(report.sweep.dropped)
if len(droppable) < 2:  # nothing to combine (the bundled CNNs can bypass one stage): offer that drop alone
    if droppable:
        add_to_recipe(handle, droppable)
    else:
        st.info("No module of this model can be dropped.")
    st.stop()

st.subheader("Drop several modules")
granularity = "blocks"
if sim is not None and handle.structure.d_mlp:  # attention-only: a block is its attention sublayer
    granularity = st.radio("Drop", ["sublayers", "blocks"], horizontal=True,
                           format_func={"sublayers": "attention + MLP sublayers (joint ranking)",
                                        "blocks": "whole blocks"}.get)
by = "measured"
if len(rr.candidates(report, granularity, by)) > 1:  # one candidate: nothing to rank
    by = st.radio("Rank by", ["similarity", "measured"], horizontal=True,
                  format_func={"similarity": "similarity (1 − cos)", "measured": "measured single-drop cost"}.get,
                  help=GLOSSARY["one_minus_cos"])
ranked = rr.candidates(report, granularity, by)
if not ranked:
    st.info("No module of this model can be dropped at this granularity.")
    st.stop()
n = st.slider("Number of modules to drop", 1, len(ranked), 1) if len(ranked) > 1 else 1
try:
    check = drop_check(handle, int(skip), tuple(ranked[:n]))
except Stopped:  # its notice is drawn, with the button that goes on: the rest of the page reads it
    st.stop()
metric = report.metric
st.dataframe({
    "module": [m.part for m in check.modules],
    f"Δ {label} alone (measured)": [metric_change(metric, d) for d in check.single],
}, hide_index=True)
cols = st.columns(3)
cols[0].metric(f"predicted Δ {label}", metric_change(metric, check.predicted), help="sum of the single-drop changes")
cols[1].metric(f"measured Δ {label}", metric_change(metric, check.measured), help="all chosen modules dropped together")
if check.together.kl_to_base is not None:  # a denoiser outputs images: no distribution, no KL
    cols[2].metric("KL to base (measured)", f"{check.together.kl_to_base:.4g}", help=GLOSSARY["kl"])
st.caption("Predicted assumes the costs add up; the gap to the measured value shows how much the "
           "dropped modules interact.")
add_to_recipe(handle, check.modules)
