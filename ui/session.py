"""The session: which base model is loaded, the user's compression lab for it (the `Lab`
owns the recipe: every page that changes the recipe asks the lab), and the one guard every
page runs under.

Base models come from `st.cache_resource` and are never mutated (read-only, shared
by every browser session); anything a user edits lives in `st.session_state`.

The two loading opt-ins (pickled checkpoints, repository code) can run code on the
server, so they belong to whoever runs it, not to each visitor: a visitor sees a box
for one only when the server was started with its environment variable (`OPT_INS`),
and even then the box starts unticked in every session.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import streamlit as st

from analysis.compress.lab import Lab
from lib.errors import LayerScopeError
from lib.handle import ModelHandle
from lib.models import load_model
from lib.progress import Progress
from ui.cache import base_forward_seconds, base_outputs, batch_key, eval_batch, prepared_base
from ui.progress import progress_bar, stoppable

DEFAULT_SPEC = "zoo:code-lm"
ENV_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class OptIn:
    """A loading opt-in: `argument` of `load_model`, the sidebar box that sets it
    (session key `key`), and the environment variable `env` that lets the server offer it."""

    argument: str
    key: str
    name: str  # the box's name in messages; its label may add a detail
    label: str
    help: str
    env: str
    refused: str  # what this server refuses while `env` is not set

    def offered(self) -> bool:
        """Whether whoever runs the server has enabled this opt-in (read at every run)."""
        return os.environ.get(self.env, "").strip().lower() in ENV_TRUE

    @property
    def control(self) -> str:
        """The app's words for `argument=True` in a library message."""
        box = f'the "{self.name}" box under "Loading options" in the sidebar'
        if self.offered():
            return box
        return f"{box}, which whoever runs this server must first switch on (start it with {self.env}=1)"

    @property
    def note(self) -> str:
        """What the sidebar says instead of the box while the server does not offer it."""
        return (f"{self.refused} are refused on this server. Whoever runs it can offer a box for them by "
                f"starting it with `{self.env}=1`.")


OPT_INS = (
    OptIn(argument="allow_pickle", key="allow_pickle", name="Allow pickled checkpoints",
          label="Allow pickled checkpoints (.bin/.pt)",
          help="Pickle files can run code when loaded. Only for sources you trust.",
          env="LAYERSCOPE_ALLOW_PICKLE", refused="Pickled checkpoints (.bin/.pt)"),
    OptIn(argument="trust_remote_code", key="trust_code", name="Trust remote code", label="Trust remote code",
          help="Runs Python code shipped with the model. Only for sources you trust.",
          env="LAYERSCOPE_TRUST_REMOTE_CODE", refused="Models that ship their own Python code"),
)


def app_message(error: Exception) -> str:
    """A library error's message, with argument names replaced by the app's controls
    (and, for an opt-in this server does not offer, how its owner can offer it)."""
    text = str(error)
    for opt_in in OPT_INS:
        text = text.replace(f"{opt_in.argument}=True", opt_in.control)
    return text


def opted_in() -> dict[str, bool]:
    """The session's opt-ins as `load_model` arguments: ticked, and offered by the server."""
    return {o.argument: o.offered() and bool(st.session_state.get(o.key, False)) for o in OPT_INS}


@contextmanager
def guard() -> Iterator[None]:
    """Run a page: an error the user caused is shown with `st.error` and the page stops;
    the loaded model and the recipe are untouched."""
    try:
        yield
    except LayerScopeError as e:
        st.error(app_message(e))
        st.stop()


@dataclass(frozen=True)
class LoadRequest:
    spec: str
    allow_pickle: bool = False
    trust_remote_code: bool = False
    device: str = "auto"
    dtype: str = "auto"


def load_base(request: LoadRequest) -> ModelHandle:
    """The shared base model for `request`: the default model in a cache of its own, which
    visitors loading three other models cannot push out; any other in a cache of three."""
    return _load_default(request) if request == LoadRequest(DEFAULT_SPEC) else _load_other(request)


@st.cache_resource(max_entries=1, show_spinner=False)
def _load_default(request: LoadRequest) -> ModelHandle:
    return _load(request)


@st.cache_resource(max_entries=3, show_spinner=False)
def _load_other(request: LoadRequest) -> ModelHandle:
    return _load(request)


def _load(request: LoadRequest) -> ModelHandle:
    return load_model(request.spec, allow_pickle=request.allow_pickle,
                      trust_remote_code=request.trust_remote_code, device=request.device, dtype=request.dtype)


def placement_choice() -> dict[str, str]:
    """The sidebar's device and precision choice, as `load_model` arguments."""
    return {"device": st.session_state.get("load_device", "auto"), "dtype": st.session_state.get("load_dtype", "auto")}


def request_load(request: LoadRequest) -> bool:
    """Try to load a model; on success it becomes the session's model. On failure
    the error is kept for the page and the previous model stays loaded. An opt-in the
    server does not offer is dropped from the request, whatever the session holds."""
    request = replace(request, **{o.argument: getattr(request, o.argument) and o.offered() for o in OPT_INS})
    try:
        with st.spinner(f"Loading {request.spec} ..."):
            load_base(request)
    except LayerScopeError as e:
        st.session_state["load_error"] = app_message(e)
        return False
    except Exception as e:  # noqa: BLE001 - an unexpected backend failure must not crash the app
        st.session_state["load_error"] = f"Loading {request.spec!r} failed: {type(e).__name__}: {e}"
        return False
    st.session_state["load_request"] = request
    st.session_state.pop("load_error", None)
    return True


def current_handle() -> ModelHandle | None:
    """The session's loaded base model (the default model on first visit)."""
    request = st.session_state.get("load_request")
    if request is None:
        if not request_load(LoadRequest(DEFAULT_SPEC)):
            return None
        request = st.session_state["load_request"]
    return load_base(request)


def require_handle() -> ModelHandle:
    """The loaded model, or a clear message and `st.stop()`."""
    handle = current_handle()
    if handle is None:
        st.error(st.session_state.get("load_error", "No model is loaded.")
                 + " Pick a model in the sidebar.")
        st.stop()
    return handle


def current_lab(handle: ModelHandle) -> Lab | None:
    """This session's lab for the loaded model and evaluation batch, if one was made (else None)."""
    return st.session_state.get("labs", {}).get(batch_key(handle))


def session_lab(handle: ModelHandle) -> Lab:
    """This session's lab for the loaded model, made on first use (it measures the base, under
    a bar with a Stop: `Stopped` from then on, with its notice, until the visitor goes on).
    One per model, so switching models and back keeps each recipe; a lab made after the
    visitor resized the evaluation batch starts from the recipe of the model's last lab."""
    labs = st.session_state.setdefault("labs", {})
    key = batch_key(handle)
    if key not in labs:
        base_outputs(handle, stop=True)  # the one forward it needs: under its own bar, with a Stop
        outputs = prepared_base(handle)  # shared by every lab on this model and batch
        lab = stoppable(("lab", *key), lambda step: Lab(handle, eval_batch(handle), outputs, progress=step,
                                                        forward_seconds=base_forward_seconds(handle)),
                        "Measuring the base model", "Nothing of it is kept: going on measures it again.")
        before = [k for k in labs if k[0] == handle.fingerprint]  # one lab per model: the old batch's goes
        labs[key] = lab  # kept from here: a stop while the recipe is carried over leaves it at the base
        old = labs[before[-1]] if before else None
        if old is not None and old.current.edits:
            kept = "The lab starts from the base model here, and your recipe is kept for the previous batch size."
            if not change_recipe("Measuring your recipe on the resized evaluation batch",
                                 lambda p: lab.apply(old.recipe, p), undone=kept):
                st.info(kept)  # under the error: the old lab stays (and its recipe) for the batch it was made on
                before = []
        for k in before:
            del labs[k]
    return labs[key]


def change_recipe(label: str, act: Callable[[Progress], object], undone: str = "The recipe is as it was.") -> bool:
    """Run one change of a lab's recipe (`act(progress)`) under a progress bar, with a Stop
    button that leaves it undone (its toast says `undone`); on a user error show it where
    the page is, leave the recipe as it was and return False."""
    done = []  # a Stop clicked as the bar goes stops the run after the change was made

    def stopped() -> None:
        st.toast(f"Stopped after: {label}; the change was made." if done else f"Stopped: {label}. {undone}")

    try:
        with progress_bar(label, stopped) as update:
            act(update)
            done.append(True)
    except LayerScopeError as e:
        st.error(app_message(e))
        return False
    return True
