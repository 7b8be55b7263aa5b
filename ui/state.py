"""Session state and caches: the loaded base model, its evaluation batch and baseline.

Base models come from `st.cache_resource` and are never mutated (read-only, shared
by every browser session); analysis results from `st.cache_data`, keyed by the
model fingerprint; anything a user edits lives in `st.session_state`.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from lib import data
from lib.handle import ModelHandle
from lib.metrics import Metrics, evaluate
from lib.models import ModelLoadError, load_model

DEFAULT_SPEC = "zoo:code-lm"


@dataclass(frozen=True)
class LoadRequest:
    spec: str
    allow_pickle: bool = False
    trust_remote_code: bool = False


@st.cache_resource(max_entries=3, show_spinner=False)
def load_base(request: LoadRequest) -> ModelHandle:
    return load_model(request.spec, allow_pickle=request.allow_pickle,
                      trust_remote_code=request.trust_remote_code)


def request_load(request: LoadRequest) -> bool:
    """Try to load a model; on success it becomes the session's model. On failure
    the error is kept for the page and the previous model stays loaded."""
    try:
        with st.spinner(f"Loading {request.spec} ..."):
            load_base(request)
    except ModelLoadError as e:
        st.session_state["load_error"] = str(e)
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


@st.cache_data(show_spinner=False, max_entries=8)
def eval_batch(_handle: ModelHandle, fingerprint: str) -> data.Batch:
    return data.default_batch(_handle)


@st.cache_data(show_spinner=False, max_entries=8)
def baseline(_handle: ModelHandle, fingerprint: str) -> Metrics:
    """Baseline metrics of the base model on its evaluation batch."""
    return evaluate(_handle, eval_batch(_handle, fingerprint))


def recipe() -> list:
    """The user's compression recipe for the loaded model (kept across pages)."""
    handle = current_handle()
    key = handle.fingerprint if handle is not None else ""
    if st.session_state.get("recipe_for") != key:
        st.session_state["recipe_for"] = key
        st.session_state["recipe"] = []
    return st.session_state["recipe"]
