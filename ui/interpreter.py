"""Cached computations behind the Interpreter page, keyed by model fingerprint and what
each result really depends on.

Gradients and float64 run on a private copy of the base model (`analysis.interpreter.
gradients.working_copy`), made once per model and kept in a store of its own that holds one
(a copy is a whole model, which `ui.store.tensor_bytes` does not count). Results are small
and go through the no-copy `ui.store.STORE`, under a progress bar where they are computed.
"""

from __future__ import annotations

import streamlit as st
import torch

from analysis.interpreter import attributions as ic
from analysis.interpreter import gradients, relu
from analysis.interpreter import transformer as it
from analysis.interpreter.attributions import AttributionComparison
from analysis.interpreter.relu import LinearMap
from analysis.interpreter.transformer import TokenContributions
from lib.handle import ModelHandle
from lib.progress import Progress
from ui.cache import eval_batch
from ui.progress import NOT_KEPT, counting_blocks, stored
from ui.store import TensorStore

COPIES = TensorStore(max_entries=1)  # a float64 copy is 2x a float32 model (4x bfloat16): one at a time
N_STEPS = 32  # integrated-gradients steps
LINEARISE_FORWARDS = 2  # `linearise_lm`'s passes through the blocks: at the prompt (then its backward), at zero


def working_copy(handle: ModelHandle) -> ModelHandle:
    """The float64 private copy gradients run on (read-only once made; hooks under its lock)."""
    key = ("interpreter_copy", handle.fingerprint)
    found = COPIES.get(key)
    if found is None:
        with st.spinner("Making a float64 copy of the model to take gradients on ..."):
            found = gradients.working_copy(handle)
        COPIES.put(key, found)
    return found


def image(handle: ModelHandle, index: int) -> torch.Tensor:
    """Evaluation image `index` [1, 8, 8]."""
    return eval_batch(handle).images[index]


def linear_map(handle: ModelHandle, index: int) -> LinearMap:
    return stored(("interpreter_map", handle.fingerprint, index),
                  lambda _: relu.linear_map(working_copy(handle), image(handle, index)),
                  "Freezing the network at this image")


def image_comparison(handle: ModelHandle, index: int, target: int) -> AttributionComparison:
    linear = linear_map(handle, index)
    return stored(("interpreter_captum", handle.fingerprint, index, target),
                  lambda step: ic.image_attributions(working_copy(handle), linear, target, N_STEPS, progress=step),
                  "captum attributions", stop=NOT_KEPT)


def token_contributions(handle: ModelHandle, prompt: str, token: int, versus: int | None) -> TokenContributions:
    tokens = it.prompt_tokens(handle, prompt)
    target = it.logit_target(handle, token, versus)
    it.check_linearisable(handle)  # before the float64 copy

    def compute(step: Progress) -> TokenContributions:
        model = working_copy(handle)
        with counting_blocks(model, step, forwards=LINEARISE_FORWARDS):  # the blocks move the bar; a Stop ends it there
            return it.token_contributions(model, tokens, target)

    return stored(("interpreter_tokens", handle.fingerprint, prompt, token, versus), compute,
                  "Linearising the model", stop=NOT_KEPT)


def token_comparison(handle: ModelHandle, prompt: str, token: int, versus: int | None) -> AttributionComparison:
    exact = token_contributions(handle, prompt, token, versus)
    return stored(("interpreter_token_captum", handle.fingerprint, prompt, token, versus),
                  lambda step: ic.token_attributions(working_copy(handle), exact, N_STEPS, progress=step),
                  "captum attributions", stop=NOT_KEPT)
