"""What every method family of the compression lab is made of: a `Method` (name, the model
kinds it applies to, a line of help, and its controls) and the widgets several families
share (a sparsity slider, the scope of an unstructured edit, the blocks or stages still
there). The families themselves are the other modules of `ui.lab`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import streamlit as st

from analysis.compress.edits import Edit
from lib.handle import ModelHandle
from ui.glossary import GLOSSARY

LM = ("causal-lm",)
IMAGES = ("image-classifier", "image-to-image")
LM_AND_IMAGES = LM + IMAGES

Controls = Callable[[ModelHandle, ModelHandle], "Edit | tuple[Edit, ...] | None"]


@dataclass(frozen=True)
class Method:
    """An edit family as the lab offers it: `controls(base, edited)` draws its widgets and
    returns the edit (None while nothing is chosen; a tuple for a family whose choice is several
    recipe steps, such as a mixed-precision allocation); `edited` is the current edited model,
    so controls offer only what is still there (heads left, layers not removed)."""

    name: str
    kinds: tuple[str, ...]
    help: str
    controls: Controls
    available: Callable[[ModelHandle], bool]


def method(name: str, kinds: tuple[str, ...], help: str,
           available: Callable[[ModelHandle], bool] = lambda handle: True) -> Callable[[Controls], Method]:
    """Make a controls function the `Method` of one edit family for models of `kinds` (a
    decorator: the decorated name is then the `Method`; its module lists it in `METHODS`)."""

    def make(controls: Controls) -> Method:
        return Method(name, kinds, help, controls, available)

    return make


# ---------------------------------------------------------------------- shared widgets


def sparsity_slider(key: str) -> float:
    percent = st.slider("Sparsity (share of weights set to zero)", 0, 95, 50, step=5, format="%d%%",
                        key=f"lab_{key}_sparsity", help=GLOSSARY["sparsity"])
    return percent / 100


def live_layers(edited: ModelHandle) -> list[int]:
    """Blocks of an LM copy that are still there."""
    gone = set(edited.structure.removed)
    return [layer for layer in range(edited.structure.n_layers) if f"block {layer}" not in gone]


def live_stages(edited: ModelHandle) -> list[str]:
    """Stages of an image model that still hold a linear layer (conv or fully connected)."""
    return list(dict.fromkeys(str(edited.place(name)[0]) for name in edited.linear_layers()))


def scope_controls(base: ModelHandle, edited: ModelHandle, key: str) -> tuple[str, tuple]:
    """Which linear layers an unstructured edit acts on: (scope, chosen layers)."""
    if base.kind in LM:
        scopes = ["all", "attention"] + (["mlp"] if base.structure.d_mlp else []) + ["layers"]
        names = {"all": "all blocks", "attention": "attention only", "mlp": "MLP only", "layers": "chosen blocks"}
    else:
        scopes, names = ["all", "layers"], {"all": "all layers", "layers": "chosen stages"}
    scope = st.radio("Scope", scopes, format_func=names.get, horizontal=True, key=f"lab_{key}_scope")
    if scope != "layers":
        return scope, ()
    if base.kind in LM:
        chosen = st.multiselect("Blocks", live_layers(edited), key=f"lab_{key}_blocks")
    else:
        chosen = st.multiselect("Stages", live_stages(edited), key=f"lab_{key}_stages")
    return scope, tuple(chosen)
