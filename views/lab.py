"""Compression lab: cut the model and watch what every change costs."""

import streamlit as st

from ui import links
from ui.lab import compare
from ui.lab import panels as ui
from ui.lab.journal import experiments_view
from ui.progress import Stopped
from ui.session import require_handle, session_lab

handle = require_handle()
st.title(f"Compression lab · {handle.spec}")
st.caption("Build a recipe of edits. Each change is applied to a private copy of the loaded model (the model "
           "itself is never touched) and measured on the evaluation set against the base model.")
try:
    lab = session_lab(handle)
except Stopped:  # its notice is drawn, with the button that goes on: everything below reads the lab
    st.stop()
links.apply_pending(lab)  # a recipe the page's link brought, checked like an uploaded file

controls, recipe = st.columns([3, 2], gap="large")
with controls:
    st.subheader("Add an edit")
    ui.edit_controls(lab)
with recipe:
    st.subheader("Recipe")
    ui.recipe_list(lab)

st.subheader("Edited model vs base")
ui.metrics_panel(lab)
removable = "heads, sublayers or blocks are removed" if handle.kind == "causal-lm" else "stages are bypassed"
st.caption("Arrows show the change from the base model (grey: within the evaluation's noise). Pruned weights "
           "are set to zero but still stored, so size "
           f"falls only when {removable} or weights are quantized (codes, scales and zero points are counted). "
           "Latency: the edited model and the base are timed in alternating pairs in the same moment, and a change "
           "is shown only when it stands out of that timing's own spread; the FLOP prediction beside it counts the "
           f"arithmetic. Compute falls only when {removable} or layers are factorised: pruned and quantized weights "
           "are multiplied in float as before (activation quantization even adds the simulation's work).")

st.subheader("What the recipe changed")
compare.what_changed(lab)

st.subheader("Every recipe tried")
ui.history_view(lab)
st.caption("Red: the Pareto frontier (no other recipe is both cheaper and better). Click a point to make its "
           "recipe current again.")
experiments_view(lab)

st.subheader("What the edits did, layer by layer")
ui.layer_view(lab)

st.subheader("Export and import")
ui.downloads(lab)
ui.upload(lab)
