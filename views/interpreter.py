"""Interpreter page: the exact linear map the network applies to one input."""

import streamlit as st

from analysis.interpreter import plots as pi
from analysis.interpreter import report
from analysis.interpreter.relu import output_labels
from analysis.interpreter.transformer import shown_token
from analysis.plots import WHITESPACE_NOTE, image_heatmap
from analysis.predict import next_tokens
from lib.data import MAX_PROMPT_CHARS
from ui import interpreter as cached
from ui.cache import eval_batch
from ui.glossary import GLOSSARY
from ui.model import prompt_notes
from ui.progress import Stopped
from ui.remember import keep, recall
from ui.session import require_handle

handle = require_handle()
st.title("Linear interpreter")
st.caption("Freeze every nonlinearity at its state for one input (ReLU gates and max-pool choices; for a "
           "transformer also LayerNorm scales and attention patterns) and the network is exactly linear there: "
           "output = A·input + b. A and b show how it really decides.")
ERROR_HELP = GLOSSARY["reconstruction_error"] + " b comes from a separate pass at a zero input."
CAPTUM_HELP = " ".join(GLOSSARY[k] for k in ("saliency", "integrated_gradients", "deeplift"))


def image_view() -> None:
    batch = eval_batch(handle)
    index = st.slider("Evaluation image", 0, len(batch.labels) - 1, 0, key=f"interpreter_image_{handle.spec}")
    linear = cached.linear_map(handle, index)
    labels = output_labels(linear)
    classifier = len(linear.output_shape) == 1
    left, middle, right = st.columns(3)
    left.plotly_chart(image_heatmap(linear.x0, f"input x0 (image {index})"))
    if classifier:
        target = middle.selectbox("Target class", range(linear.n_outputs), index=int(linear.output.argmax()),
                                  format_func=labels.__getitem__, help="Defaults to the predicted class.")
    else:
        row = middle.number_input("Output pixel: row", 0, linear.output_shape[-2] - 1, 3)
        col = middle.number_input("Output pixel: column", 0, linear.output_shape[-1] - 1, 3)
        target = int(row) * linear.output_shape[-1] + int(col)
    right.metric("reconstruction error", f"{linear.error:.1e}", help=ERROR_HELP)
    right.caption(report.frozen_sentence(linear))
    st.caption(report.reconstruction_sentence(linear.error))
    if classifier:
        st.subheader("How each class votes")
        what = st.radio("Show", ["votes", "rows"], horizontal=True, format_func={
            "votes": "vote maps x0 ⊙ A_c (each pixel's share of the logit)", "rows": "rows of A (the weights)"}.get)
        st.plotly_chart(pi.class_maps(linear, labels, what), width="stretch")
        st.caption("Red pushes the class up, blue down; one colour scale for all classes. A vote map sums to the "
                   "class's logit minus its bias.")
        st.subheader("Input or bias: where each logit comes from")
        st.plotly_chart(pi.input_and_bias_bars(linear, labels), width="stretch")
    else:
        st.subheader("Output = input part + bias")
        st.plotly_chart(pi.output_parts(linear), width="stretch")
        st.subheader("Basis images of the map")
        what = st.radio("Show", ["columns", "rows"], horizontal=True, format_func={
            "columns": "columns of A: what a unit impulse at input pixel (r, c) adds to the output",
            "rows": "rows of A: output pixel (r, c)'s weights on the input"}.get)
        st.plotly_chart(pi.mosaic(linear, what), width="stretch")
        st.caption("Tile (r, c) of the grid belongs to pixel (r, c); each tile is an 8×8 image.")
    st.caption(report.bias_sentence(linear, labels, target))
    st.subheader("The map's main input patterns (SVD of A)")
    st.plotly_chart(pi.svd_gallery(linear), width="stretch")
    st.caption("The input images A amplifies most, strongest first (right singular vectors, sign fixed so each "
               "sums to ≥ 0).")
    st.subheader(f"captum beside the exact answer for {labels[target]}", help=CAPTUM_HELP)
    try:
        comparison = cached.image_comparison(handle, index, target)
    except Stopped:  # its notice is drawn, with the button that goes on; the rest of the page reads it
        st.stop()
    st.plotly_chart(pi.attribution_maps(comparison), width="stretch")
    st.table(report.attribution_rows(comparison), hide_index=True)  # a table wraps long cells; a dataframe cuts them
    st.caption("Each map is scaled to its own largest value; captum runs on the real network (nothing frozen). "
               + report.zero_sentence(comparison))


def text_view() -> None:
    example = "t5 t9 t2 t7 t5 t9" if handle.eval_task == "repeated-tokens" else "def fibonacci(n):\n    "
    key = f"interpreter_prompt_{handle.spec}"  # the prompt typed before another page was visited comes back
    prompt = keep(key, st.text_area("Prompt", value="" if recall(key) else example, max_chars=MAX_PROMPT_CHARS,
                                    height=100, key=key))
    top = next_tokens(handle, prompt, k=10)  # a prompt it cannot use ends in the page's guard
    prompt_notes(top, handle.structure.n_ctx)
    names = {i: f"“{shown_token(t)}”  (p = {float(p):.2f})" for i, t, p in zip(top.token_ids, top.tokens, top.probs)}
    kind = st.radio("Target", ["logit", "difference"], horizontal=True, format_func={
        "logit": "logit of a next token", "difference": "logit difference of two tokens"}.get)
    left, right = st.columns(2)
    token = left.selectbox("Next token", top.token_ids, format_func=names.get, help="The model's top 10 guesses.")
    versus = None
    if kind == "difference":
        others = [i for i in top.token_ids if i != token]
        versus = right.selectbox("minus the logit of", others, format_func=names.get)
    try:
        result = cached.token_contributions(handle, prompt, token, versus)
    except Stopped:  # its notice is drawn, with the button that goes on; the rest of the page reads it
        st.stop()
    cols = st.columns(4)
    cols[0].metric("target value F(x0)", f"{result.value:+.4g}", help=result.target.label)
    cols[1].metric("from the tokens", f"{float(result.contributions.sum()):+.4g}")
    cols[2].metric("bias b", f"{result.bias:+.4g}", help="The frozen model's target at zero input embeddings.")
    cols[3].metric("reconstruction error", f"{result.error:.1e}", help=ERROR_HELP)
    st.caption(report.reconstruction_sentence(result.error) + " " + report.lm_frozen_sentence(result))
    st.subheader(f"Which tokens push the {result.target.label}")
    st.plotly_chart(pi.token_strip(result), width="stretch")
    st.caption(report.token_sentence(result) + f" Whitespace is shown as {WHITESPACE_NOTE}; hover for long tokens.")
    if result.has_positions:
        st.subheader("Token or position: what each embedding contributes")
        st.plotly_chart(pi.token_parts_bars(result), width="stretch")
    st.subheader("captum beside the exact contributions", help=CAPTUM_HELP)
    try:
        comparison = cached.token_comparison(handle, prompt, token, versus)
    except Stopped:  # its notice is drawn, with the button that goes on; the rest of the page reads it
        st.stop()
    st.plotly_chart(pi.token_attribution_strips(comparison, result.texts), width="stretch")
    st.table(report.attribution_rows(comparison), hide_index=True)  # a table wraps long cells; a dataframe cuts them
    st.caption("captum runs on the real model (nothing frozen), with respect to the summed input embeddings. "
               + report.zero_sentence(comparison))


if handle.kind == "causal-lm":
    text_view()
else:
    image_view()
