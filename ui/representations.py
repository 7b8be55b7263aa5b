"""Cached computations behind the Representations view, in the no-copy `ui.store.STORE`,
keyed by the model fingerprint and what each part really depends on: the labelled probe
text by the model (its tokenizer and shape choose the windows), the probes (of tokens, or of
an image model's stages) by the model, the weights across depth by the model and the delta
rank of the sharing."""

from __future__ import annotations

import streamlit as st

from analysis.representations.dataset import ProbeText, probe_text
from analysis.representations.depth import DepthFit, depth_fit
from analysis.representations.probes import ProbeResult, probe_layers
from analysis.representations.stage_probes import probe_stages
from lib.handle import ModelHandle
from lib.progress import Progress
from ui.progress import stored

NOT_KEPT = "Nothing of it is kept: going on probes again."


def labelled_text(handle: ModelHandle) -> ProbeText:
    """Windows of the held-out source with each token's properties (tokenize and ast)."""

    def compute(_: Progress | None) -> ProbeText:
        with st.spinner("Reading the evaluation text with Python's tokenize and ast ..."):
            return probe_text(handle)

    return stored(("representations.text", handle.fingerprint), compute)


def probes(handle: ModelHandle) -> ProbeResult:
    """Every property probed at every depth from one recorded pass."""
    text = labelled_text(handle)
    return stored(("representations.probes", handle.fingerprint),
                  lambda step: probe_layers(handle, text, progress=step), "Linear probes", stop=NOT_KEPT)


def stage_probes(handle: ModelHandle) -> ProbeResult:
    """Every image property probed on the input and every stage's output, from one recorded pass."""
    return stored(("representations.stages", handle.fingerprint),
                  lambda step: probe_stages(handle, progress=step), "Linear probes of every stage", stop=NOT_KEPT)


def depth(handle: ModelHandle, share_rank: int) -> DepthFit:
    """The weights-across-depth fit (weights only): family by family, then pair by pair of
    blocks, under a bar with a Stop (a stopped fit keeps nothing)."""
    return stored(("representations.depth", handle.fingerprint, share_rank),
                  lambda step: depth_fit(handle, share_rank, progress=step), "Fitting every weight family across depth",
                  stop="Nothing of it is kept: going on fits again.")
