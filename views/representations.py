"""Representations page: what each depth knows about the code it reads (linear probes),
and how the weights change from block to block."""

import streamlit as st

from analysis.representations import plots
from analysis.representations import report as rep
from lib.errors import CapabilityError
from ui import representations as cached
from ui.glossary import GLOSSARY
from ui.session import require_handle

SHARE_RANKS = (0, 1, 2, 4, 8, 16, 32, 64)

handle = require_handle()
st.title("Representations")
st.caption("Two views of what the layers hold. Linear probes ask each depth's residual stream for properties of the "
           "code being read; the weights view asks whether the blocks are one module stretched over depth.")
if handle.kind != "causal-lm":  # nothing went wrong: this view has nothing to show for an image model
    st.info(f"Probes of code properties and weights across transformer blocks need a language model: {handle.spec} "
            f"is an image model ({handle.kind}). Pick zoo:code-lm in the sidebar to see them.")
    st.stop()

st.subheader("What each depth knows", help=GLOSSARY["linear_probe"] + " " + GLOSSARY["depth_layer_block"])
try:
    result = cached.probes(handle)
except CapabilityError as e:  # a tokenizer without offsets: the weights below still apply
    st.info(f"{e} The weights across depth are shown below.")
    result = None
if result is not None:
    st.plotly_chart(plots.probe_lines(result), width="stretch")
    st.caption("One ridge-regression probe per property and depth, trained on some files of the held-out source "
               "and tested on others. Blue: the probe; red: the same probe on the control task (random classes "
               "fixed per token type); green: the token alone; grey: always the most frequent class. "
               + " ".join(rep.property_sentences(result)), help=GLOSSARY["token_alone_baseline"])
    st.caption(rep.selectivity_sentence(result), help=GLOSSARY["control_task"] + " " + GLOSSARY["selectivity"])
    with st.expander("Which tokens were labelled"):
        st.write(rep.labelled_sentence(result))

st.subheader("Weights across depth", help=GLOSSARY["depth_linearity"])
bound = max(0, min(handle.structure.d_model, 64))
rank = st.select_slider("Rank of the low-rank correction when a block shares its neighbour's weights",
                        [r for r in SHARE_RANKS if r <= bound], value=0, key=f"share_rank_{handle.spec}",
                        help=GLOSSARY["shared_blocks"] + " Rank 0 is pure sharing, as in the lab's shared-blocks edit.")
fit = cached.depth(handle, int(rank))
fitted, cosines, shared = rep.depth_sentences(fit)
left, right = st.columns(2)
with left:
    st.plotly_chart(plots.residual_lines(fit), width="stretch")
    st.caption("What the best line θ_A + (l/L)·θ_B through a family's layers leaves of each layer, as a share of "
               "its norm; the dashed line is what layers that share nothing would leave. " + fitted)
with right:
    st.plotly_chart(plots.cosine_lines(fit), width="stretch")
    st.caption("Cosine between the weights of consecutive blocks, per family. " + cosines)
st.plotly_chart(plots.share_bars(fit), width="stretch")
st.caption("How much each block's weights would change if it took the previous block's (the Compression lab's "
           "shared-blocks edit); lower costs less. " + shared, help=GLOSSARY["shared_blocks"])
