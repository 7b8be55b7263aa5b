"""Model page: what is loaded, how good it is on the evaluation set, what it predicts."""

import time

import streamlit as st
import torch

from analysis import plots
from analysis.metric_text import metric_value, size_text
from analysis.predict import next_tokens, predict_image
from lib.data import MAX_PROMPT_CHARS
from lib.handle import ModelHandle
from lib.metrics import LABELS, QUALITY_FIELDS, input_psnr_db, model_inputs
from lib.zoo import ZOO, model_card, zoo_name
from ui.cache import base_outputs, eval_batch, scored_baseline
from ui.glossary import GLOSSARY
from ui.model import base_latency, batch_control, prompt_notes
from ui.progress import Stopped
from ui.remember import keep, recall
from ui.session import require_handle


def baseline_section(handle: ModelHandle) -> None:
    """The base model's quality on its evaluation set, with intervals, its size and latency."""
    batch = eval_batch(handle)
    metrics, intervals = scored_baseline(handle, stop=True)  # under a bar with a Stop, as the forward
    repeated = getattr(batch, "answer_mask", None) is not None
    helps = {"bits_per_byte": GLOSSARY["bits_per_byte"], "perplexity": GLOSSARY["perplexity"],
             "nll": GLOSSARY["loss"], "psnr_db": GLOSSARY["psnr"],
             "accuracy": "Share of correct top-1 predictions" + (
                 " on the repeated half of each sequence only (from its second token on: the random first "
                 "half cannot be predicted, so perplexity, which covers every position, stays high)."
                 if repeated else " on the held-out images.")}
    items = []  # (label, value as shown, help)
    ranges = {}  # label -> the value's bootstrap interval, as text
    for name in (*QUALITY_FIELDS, "size_bits"):  # in the order every page lists metrics
        value = getattr(metrics, name)
        if value is None:
            continue
        if name == "size_bits":
            items.append(("size", size_text(value), f"{value:,} bits as stored"))
        else:
            label = "accuracy (repeated half)" if name == "accuracy" and repeated else LABELS[name]
            items.append((label, f"{value:.1%}" if name == "accuracy" else f"{value:.4g}", helps[name]))
            if name in intervals.intervals:  # shown under the value, as the lab shows a change
                ranges[label] = "95 %: {} – {}".format(*(metric_value(name, v) for v in intervals.intervals[name]))
    if metrics.psnr_db is not None:  # a denoiser's PSNR means something only above its noisy input's
        items.append(("PSNR of the noisy input", f"{input_psnr_db(batch):.4g}", GLOSSARY["noisy_psnr"]))
    attempt = st.session_state.get(f"latency_attempt_{handle.spec}", 0)
    try:
        timing, when = base_latency(handle, attempt)
    except Stopped:  # its notice is drawn, with the button that goes on; every other number is shown
        timing = when = None
    rows = model_inputs(batch).shape[0]
    if timing is not None:
        over = timing.over(rows)
        items.append(("latency", f"{timing.median_ms:.0f} ms",
                      f"Median of {timing.runs} timed forwards over {over} on this machine, after one untimed one; "
                      f"95 % interval of the median {timing.low_ms:.0f}–{timing.high_ms:.0f} ms."))
    cols = st.columns(3)
    for i, (label, value, helptext) in enumerate(items):
        cols[i % 3].metric(label, value, ranges.get(label), delta_color="off", delta_arrow="off", help=helptext)
    left, right = st.columns([3, 1], vertical_alignment="center")
    latency = "" if timing is None else (
        f" Latency measured at {time.strftime('%H:%M:%S', time.localtime(when))} over {over}: {timing.text()}; a busy "
        "machine widens the interval.")
    left.caption(f"Evaluation set: {batch.source}. Under each quality metric: its 95 % interval, a percentile "
                 f"bootstrap over the {intervals.n_units} evaluation {intervals.unit}s." + latency)
    batch_control(handle)
    if timing is not None and right.button("Time again", key="model_time_again", help="Measure the latency now "
                                           "(another session may have measured it while the machine was busy)."):
        st.session_state[f"latency_attempt_{handle.spec}"] = attempt + 1
        st.rerun()


handle = require_handle()
st.title(f"Model · {handle.spec}")
st.caption((ZOO[zoo_name(handle.spec)].description + " " if zoo_name(handle.spec) else "")
           + "What it is built of, how well it does on its evaluation set, and what it predicts for an input of yours.")

batch = eval_batch(handle)
card, quality = st.columns([2, 3])
with card:
    st.subheader("Architecture")
    rows = handle.describe()
    st.table({"property": [r[0] for r in rows], "value": [r[1] for r in rows]})
with quality:
    st.subheader("Baseline on the evaluation set")
    try:
        base_outputs(handle, stop=True)  # the one forward every number below reads: under a bar with a Stop
        scored_baseline(handle, stop=True)  # and its scoring
    except Stopped:  # its notice is drawn, with the button that goes on; the batch size can still change
        batch_control(handle)
    else:
        baseline_section(handle)
if text := model_card(handle.spec):  # full width: the card's code blocks need it
    with st.expander("Model card: how it was trained and what it scores"):
        st.caption("The card's metrics cover its whole held-out set; this page measures a fixed sample of it (the "
                   "evaluation set above), so the two differ a little.")
        st.markdown(text)

st.divider()
if handle.kind == "causal-lm":
    st.subheader("Next-token prediction")
    example = "t5 t9 t2 t7 t5 t9" if handle.eval_task == "repeated-tokens" else "def fibonacci(n):\n    "
    key = f"prompt_{handle.spec}"  # the prompt typed before another page was visited comes back
    prompt = keep(key, st.text_area("Prompt", value="" if recall(key) else example, max_chars=MAX_PROMPT_CHARS,
                                    height=120, key=key))
    result = next_tokens(handle, prompt, k=10)  # a prompt it cannot use ends in the page's guard
    prompt_notes(result, handle.structure.n_ctx)
    st.plotly_chart(plots.next_tokens_bar(result), width="stretch")
    st.caption(f"{result.n_prompt_tokens} tokens fed to the model (BOS first). Whitespace is shown as "
               f"{plots.WHITESPACE_NOTE}.", help=GLOSSARY["bos"])
else:
    st.subheader("One evaluation image")
    index = st.slider("Image", 0, len(batch.labels) - 1, 0, key=f"image_{handle.spec}")
    result = predict_image(handle, batch.images[index])
    cols = st.columns(3)
    cols[0].plotly_chart(plots.image_heatmap(result.image, f"input (label {int(batch.labels[index])})"))
    if result.probs is not None:
        cols[1].plotly_chart(plots.class_probs_bar(result), width="stretch")
        cols[2].metric("predicted class", int(torch.argmax(result.probs)))
        cols[2].caption(f"with probability {float(result.probs.max()):.3f}")
    else:
        cols[1].plotly_chart(plots.image_heatmap(result.output_image, "denoised output"))
        cols[2].plotly_chart(plots.image_heatmap(batch.targets[index], "clean target"))
