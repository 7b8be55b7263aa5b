"""Session state and caches: the loaded base model, its evaluation batch and baseline.

Base models come from `st.cache_resource` and are never mutated (read-only, shared
by every browser session); analysis results are cached by model fingerprint and
parameters (`st.cache_data`, or a small process-wide LRU for analyses that show a
progress bar while they run); anything a user edits lives in `st.session_state`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from threading import Lock

import streamlit as st

from analysis.recipe import Recipe
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


def recipe(handle: ModelHandle) -> Recipe:
    """The user's compression recipe for the loaded model (kept across pages; one per
    model, so switching models and back keeps each recipe)."""
    recipes = st.session_state.setdefault("recipes", {})
    return recipes.setdefault(handle.fingerprint, Recipe(handle.fingerprint))


class _Memo:
    """A small process-wide LRU cache keyed like `st.cache_data` (fingerprint + params).

    Used for analyses that report progress while they run: `st.cache_data` replays
    the element calls made inside a cached function, and a progress bar created
    outside it cannot be replayed.
    """

    def __init__(self, size: int = 8) -> None:
        self.size, self.items, self.lock = size, OrderedDict(), Lock()

    def get_or_compute(self, key: tuple, compute):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = compute()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


_reports = _Memo()


def redundancy(handle: ModelHandle, skip: int, progress=None):
    """The Redundancy view's report (one pass + lens + drop sweep), cached per model
    fingerprint and skip; `progress(fraction, message)` is called while computing."""
    from analysis.redundancy_report import build_report

    def compute():
        return build_report(handle, eval_batch(handle, handle.fingerprint), skip, progress=progress)

    return _reports.get_or_compute((handle.fingerprint, skip), compute)


@st.cache_data(show_spinner=False, max_entries=8)
def base_outputs(_handle: ModelHandle, fingerprint: str):
    from lib.metrics import model_inputs

    return _handle.forward(model_inputs(eval_batch(_handle, fingerprint)))


@st.cache_data(show_spinner="Dropping the modules together and re-measuring ...", max_entries=32)
def drop_check(_handle: ModelHandle, fingerprint: str, skip: int, modules: tuple):
    """Predicted vs measured change for dropping `modules` together."""
    from analysis.redundancy_report import check_drops

    report = redundancy(_handle, skip)
    return check_drops(_handle, eval_batch(_handle, fingerprint), report, list(modules),
                       base_outputs(_handle, fingerprint))


def with_progress(label: str):
    """A progress bar and a callback `(fraction, message)` that moves it."""
    bar = st.progress(0.0, text=label)

    def update(fraction: float, message: str) -> None:
        bar.progress(min(1.0, max(0.0, fraction)), text=f"{label}: {message}")

    return bar, update
