"""Cached computations behind the Channels view, in the no-copy `ui.store.STORE`, keyed
by the model fingerprint and what each part really depends on: the circuits and the
composition scores by the weights alone, the head roles by the weights (the probe is
fixed), patterns by the prompt, an intervention by the edit, the reader and the prompt."""

from __future__ import annotations

import dataclasses
import weakref
from functools import partial

import streamlit as st

from analysis.channels import circuits as ch
from analysis.channels import heads
from lib.errors import CapabilityError
from lib.handle import ModelHandle
from lib.progress import Progress
from ui.cache import baseline, batch_key, eval_batch, prepared_base
from ui.progress import counting_blocks, stored
from ui.store import STORE

NOT_KEPT = "Nothing of it is kept; going on starts it again."

EXAMPLE_PROMPTS = {  # a repeat in each, so induction has something to find
    "repeated-tokens": "t5 t17 t42 t8 t33 t21 t60 t2 t5 t17 t42 t8 t33 t21 t60 t2",
    "text": "def area(w, h):\n    return w * h\n\ndef area(w, h):\n    return",
}


def _layer_of(ref: weakref.ref, layer: int) -> dict:
    handle = ref()
    if handle is None:
        raise CapabilityError("The model these circuits were read from is no longer loaded; load it again.")
    return handle.heads.circuits()["layer"](layer)


def example_prompt(handle: ModelHandle) -> str:
    return EXAMPLE_PROMPTS.get(handle.eval_task, EXAMPLE_PROMPTS["text"])


def circuits(handle: ModelHandle) -> ch.Circuits:
    """Every head's circuits and spectra (weights only: once per fingerprint). The kept
    result reads the model's layers through a weak reference, so the shared store does not
    keep alive a model that the models' own cache let go. Stoppable (`ui.progress.Stopped`)."""

    def compute(step) -> ch.Circuits:
        return dataclasses.replace(ch.circuits(handle, step), factors=partial(_layer_of, weakref.ref(handle)))

    key = ("channels.circuits", handle.fingerprint)
    c = stored(key, compute, "Reading every head's OV and QK circuit from the weights", stop=NOT_KEPT)
    if c.factors.args[0]() is not handle:  # read from a model with these weights that the cache let go since
        c = dataclasses.replace(c, factors=partial(_layer_of, weakref.ref(handle)))
        STORE.put(key, c)  # rebound once, not on every run
    return c


def composition(handle: ModelHandle) -> ch.Composition:
    """Q-, K- and V-composition scores of every writer/reader pair (weights only; stoppable)."""
    c = circuits(handle)
    return stored(("channels.composition", handle.fingerprint), lambda step: ch.composition_scores(c, progress=step),
                  "Scoring every writer/reader pair of heads", stop=NOT_KEPT)


def role_probe(handle: ModelHandle):
    """The repeated-token probe, drawn from the ids of the model's own evaluation text."""
    return heads.role_probe(handle, vocabulary=eval_batch(handle).tokens)


def head_roles(handle: ModelHandle) -> heads.HeadRoles:
    def compute(step: Progress) -> heads.HeadRoles:
        with counting_blocks(handle, step):
            return heads.head_roles(handle, role_probe(handle))

    return stored(("channels.roles", *batch_key(handle)), compute,
                  "Recording every head's attention on a repeated-token probe", stop=NOT_KEPT)


def prompt_patterns(handle: ModelHandle, prompt: str) -> tuple[heads.PromptTokens, object]:
    """The prompt's tokens and every head's pattern on it, [L, H, T, T]."""

    def compute(step: Progress) -> tuple[heads.PromptTokens, object]:
        tokens = heads.prompt_tokens(handle, prompt)
        with counting_blocks(handle, step):
            return tokens, heads.attention_patterns(handle, tokens.ids)

    return stored(("channels.patterns", handle.fingerprint, prompt), compute, "Reading every head's attention on "
                  "your prompt")


def intervention(handle: ModelHandle, edit: heads.HeadEdit, reader: ch.Head, prompt: str) -> heads.Intervention:
    """`edit` measured on the evaluation batch (against the cached base outputs) and on the
    reader's pattern over the prompt. The base's scores come first, each under its own bar
    and once per model, not per cut."""
    def compute(step: Progress) -> heads.Intervention:
        c, tokens, batch = circuits(handle), heads.prompt_tokens(handle, prompt), eval_batch(handle)
        with counting_blocks(handle, step, scorings=1):  # the edited forward, then its scoring
            return heads.intervene(handle, batch, c, edit, reader, tokens.ids, base=prepared_base(handle),
                                   before=baseline(handle))

    return stored(("channels.intervention", *batch_key(handle), edit, reader, prompt), compute,
                  f"Running the evaluation set with {edit.label}", stop=NOT_KEPT,
                  after=lambda: (prepared_base(handle), baseline(handle)))


def _head(label: str) -> ch.Head | None:
    layer, _, head = label[1:].partition("H")
    return (int(layer), int(head)) if label[:1] == "L" and layer.isdigit() and head.isdigit() else None


def pick_from_charts(comp: ch.Composition, mode: str, pairs: list[ch.Channel], chart_keys: list[str],
                     choice_key: str) -> None:
    """Make a pair clicked in the heat map (a cell: writer row, reader column) or the graph
    (an edge's midpoint) the chosen one: it joins `pairs` if it is not there (kept for the
    session) and the choice widget `choice_key` (an index into `pairs`) is set to it. Call
    before drawing that widget; each click is applied once, so the list still works after."""
    extra = st.session_state.setdefault(f"{choice_key}_clicked", [])
    pairs.extend(c for c in extra if c not in pairs)
    for key in chart_keys:
        points = ((st.session_state.get(key) or {}).get("selection") or {}).get("points") or []
        if not points or st.session_state.get(f"{key}_applied") == repr(points[0]):
            continue
        st.session_state[f"{key}_applied"] = repr(points[0])
        point = points[0]
        data = point.get("customdata")
        if isinstance(data, (list, tuple)) and len(data) >= 4:  # heat-map cell or graph edge
            writer, reader = (int(data[0]), int(data[1])), (int(data[2]), int(data[3]))
        else:
            writer, reader = _head(str(point.get("y", ""))), _head(str(point.get("x", "")))
        if writer is None or reader is None or writer[0] >= reader[0]:
            continue
        channel = ch.Channel(writer, reader, mode, float(comp.scores[mode][writer + reader]), comp.baseline)
        if channel not in pairs:
            extra.append(channel)
            pairs.append(channel)
        st.session_state[choice_key] = pairs.index(channel)
