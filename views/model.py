"""Model page: what is loaded, how good it is on the evaluation set, what it predicts."""

import streamlit as st
import torch

from analysis import plots
from analysis.predict import next_tokens, predict_image
from lib.data import DataError
from lib.metrics import LABELS
from ui.session import require_handle
from ui.views import baseline, eval_batch

handle = require_handle()
st.title(f"Model · {handle.spec}")

card, quality = st.columns([2, 3])
with card:
    st.subheader("Architecture")
    st.table({"property": [r[0] for r in handle.describe()], "value": [r[1] for r in handle.describe()]})
with quality:
    st.subheader("Baseline on the evaluation set")
    with st.spinner("Evaluating ..."):
        batch = eval_batch(handle, handle.fingerprint)
        metrics = baseline(handle, handle.fingerprint)
    order = ("bits_per_byte", "perplexity", "nll", "accuracy", "psnr_db", "size_bits", "latency_ms")
    shown = [(k, getattr(metrics, k)) for k in order if getattr(metrics, k) is not None]
    cols = st.columns(3)
    for i, (name, value) in enumerate(shown):
        if name == "size_bits":
            cols[i % 3].metric("size", f"{value / 8 / 2**20:.2f} MiB", help=f"{value:,} bits")
        else:
            cols[i % 3].metric(LABELS[name], f"{value:.4g}")
    st.caption(f"Evaluation set: {batch.source}. Latency is one forward pass over the whole batch "
               "on this machine's CPU.")

st.divider()
if handle.kind == "causal-lm":
    st.subheader("Next-token prediction")
    example = "t5 t9 t2 t7 t5 t9" if handle.eval_task == "repeated-tokens" else "def fibonacci(n):\n    "
    prompt = st.text_area("Prompt", value=example, height=120, key=f"prompt_{handle.spec}")
    try:
        result = next_tokens(handle, prompt, k=10)
    except DataError as e:
        st.error(str(e))
        st.stop()
    if result.truncated:
        st.info(f"The prompt is longer than the model's context of {handle.structure.n_ctx} tokens: "
                f"the first {result.truncated} tokens were dropped.")
    st.plotly_chart(plots.next_tokens_bar(result), width="stretch")
    st.caption(f"{result.n_prompt_tokens} tokens fed to the model (BOS first). Whitespace is "
               "shown as · (space), ↵ (newline) and ⇥ (tab).")
else:
    st.subheader("One evaluation image")
    index = st.slider("Image", 0, len(batch.labels) - 1, 0, key=f"image_{handle.spec}")
    result = predict_image(handle, batch.images[index])
    cols = st.columns(3)
    cols[0].plotly_chart(plots.image_heatmap(result.image, f"input (label {int(batch.labels[index])})"))
    if result.probs is not None:
        cols[1].plotly_chart(plots.class_probs_bar(result), width="stretch")
        cols[2].metric("predicted", int(torch.argmax(result.probs)), f"p = {result.probs.max():.3f}")
    else:
        cols[1].plotly_chart(plots.image_heatmap(result.output_image, "denoised output"))
        cols[2].plotly_chart(plots.image_heatmap(batch.targets[index], "clean target"))
