"""Representations page: what each depth knows about what it reads (linear probes of the
code's tokens, or of a digit's class, ink mass and stroke thickness after every stage of an
image model), and how the weights change from block to block."""

import streamlit as st

from analysis.representations import plots
from analysis.representations import report as rep
from lib.errors import CapabilityError
from ui import representations as cached
from ui.glossary import GLOSSARY
from ui.progress import Stopped
from ui.session import require_handle

SHARE_RANKS = (0, 1, 2, 4, 8, 16, 32, 64)

handle = require_handle()
image_model = handle.kind != "causal-lm"
st.title("Representations")
st.caption("Two views of what the layers hold. Linear probes ask each depth for properties of what the model reads "
           + ("(a digit's class, ink mass and stroke thickness, at the input and after every stage)"
              if image_model else "(the code's tokens, from the residual stream)")
           + "; the weights view asks whether the blocks are one module stretched over depth.")

st.subheader("What each depth knows", help=GLOSSARY["linear_probe"] + " " + GLOSSARY["depth_layer_block"])
result = None
if handle.eval_task == "repeated-tokens":  # its vocabulary is t0..t63: Python source would be unknown tokens
    st.info(f"{handle.spec} was trained on sequences of random tokens, not on text: its vocabulary cannot spell "
            "Python source, so probes of code properties would read unknown tokens. The weights across depth are "
            "shown below.")
else:
    try:
        result = cached.stage_probes(handle) if image_model else cached.probes(handle)
    except Stopped:  # its notice is drawn, with the button that goes on; the weights below do not need it
        pass
    except CapabilityError as e:  # a tokenizer without offsets: the weights below still apply
        st.info(f"{e} The weights across depth are shown below.")
if result is not None:
    st.plotly_chart(plots.probe_lines(result), width="stretch")
    if image_model:
        how = ("One ridge-regression probe per property and stage output, trained on the images the model was "
               "trained on and tested on its held-out ones; properties are read from the clean digit. Blue: the "
               "probe; red: the same probe on the control task (random classes fixed per cell of similar-looking "
               "inputs: the nearest prototype in raw pixels); green: the nearest prototype's most frequent class; "
               "grey: always the most frequent class. ")
    else:
        how = ("One ridge-regression probe per property and depth, trained on some files of the held-out source "
               "and tested on others. Blue: the probe; red: the same probe on the control task (random classes "
               "fixed per token type); green: the token alone; grey: always the most frequent class. ")
    st.caption(how + " ".join(rep.property_sentences(result)),
               help=GLOSSARY["nearest_prototype_baseline" if image_model else "token_alone_baseline"])
    st.caption(rep.selectivity_sentence(result), help=GLOSSARY["control_task"] + " " + GLOSSARY["selectivity"])
    with st.expander("Which images were read and how their properties are defined" if image_model
                     else "Which tokens were labelled"):
        st.write(rep.labelled_sentence(result))

st.subheader("Weights across depth", help=GLOSSARY["depth_linearity"])
bound = max(0, min(handle.structure.d_model, 64))
rank = 0 if image_model else st.select_slider(
    "Rank of the low-rank correction when a block shares its neighbour's weights",
    [r for r in SHARE_RANKS if r <= bound], value=0, key=f"share_rank_{handle.spec}",
    help=GLOSSARY["shared_blocks"] + " Rank 0 is pure sharing, as in the lab's shared-blocks edit.")
try:
    fit = cached.depth(handle, int(rank))
except CapabilityError as e:  # an image model's stages differ in shape: nothing to compare across depth
    st.info(f"{e} " + ("Probes of the stages are shown above." if image_model else
                       "The probes above still apply." if result is not None else ""))
    st.stop()
except Stopped:  # its notice is drawn, with the button that goes on: the charts below read it
    st.stop()
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
