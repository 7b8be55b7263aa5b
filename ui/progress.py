"""Long work under a progress bar, with a Stop button beside it where the caller can take a
stop, and results kept in the no-copy `ui.store.STORE`.

A click on Stop reruns the page: Streamlit ends the running script at its next draw (the
bar's next redraw), and the button's callback runs before the new run. A stopped step of
`stored` stays stopped for this visitor (`Stopped`, with a notice and a button that goes
on) until they go on; a stopped action (a change of the recipe) is simply not done.

Stop and Go on buttons are drawn inside a block. Streamlit keeps a focused button that the
next run replaces with another element (the one just clicked) at the end of the page until
it loses focus; pressing a Stop there moved the focus, the kept button vanished, the page
shifted under the pointer and the click was lost. A replaced block is not kept.
"""

from __future__ import annotations

import itertools
import threading
import time
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

import streamlit as st
from streamlit.runtime.scriptrunner import add_script_run_ctx

from analysis.metric_text import duration_text
from lib.errors import LayerScopeError
from lib.handle import ModelHandle
from lib.progress import Progress
from lib.scoring import readout_blocks, told_of_windows
from ui.store import STORE

T = TypeVar("T")
# The bar appears only once the work has run FIRST_DRAW_S (short work draws nothing, like
# st.spinner: no flash of a bar) and then redraws at most every PROGRESS_INTERVAL_S (each
# redraw is browser work on the CPUs the computation shares when both run on one machine).
FIRST_DRAW_S = 0.5
PROGRESS_INTERVAL_S = 1.0


NOT_KEPT = "Nothing of it is kept: going on runs it again."  # what a stop keeps, for most steps
STOPPED = "stopped_steps"  # session state: the `stored` keys of the steps this visitor stopped
_BUTTONS = itertools.count()  # Stop and Go on buttons' keys: unique in a run (a click's callback is the run before's)


class Stopped(LayerScopeError):
    """A step this visitor stopped: `stored` drew its notice (with a button that goes on)
    where the step would be; the caller leaves out what needed its result (a caller that
    shows user errors shows this one as one)."""

    def __init__(self, label: str):
        super().__init__(f"{label} was stopped; press Go on where it stopped to finish it.")


@contextmanager
def progress_bar(label: str, on_stop: Callable[[], None] | None = None) -> Iterator[Progress]:
    """A progress bar where the page is now, drawn FIRST_DRAW_S after the work starts
    (with the latest progress reported) and gone on exit (also when the body raises);
    yields `update(fraction, message)`, which redraws it at most every PROGRESS_INTERVAL_S,
    with the time left estimated from the pace so far (`time_left`). With `on_stop`, a
    Stop button under the bar: a click ends the work at its next redraw and calls
    `on_stop` (as the button's callback, before the page runs again)."""
    slot = st.empty()
    stop_slot = st.empty() if on_stop is not None else None
    lock = threading.Lock()
    began = time.perf_counter()
    state = {"latest": (0.0, label), "drawn_at": None, "open": True, "first": None}

    def draw() -> None:  # from the script thread or, once, from the timer
        with lock:
            if state["open"]:
                fraction, text = state["latest"]
                slot.progress(min(1.0, max(0.0, fraction)), text=text)
                if stop_slot is not None and state["drawn_at"] is None:  # in a block: see the module's note
                    stop_slot.container().button(
                        "Stop", key=f"stop_{next(_BUTTONS)}", on_click=on_stop, icon=":material/stop:",
                        help="Ends this step at its next update; what a stop keeps is said then.")
                state["drawn_at"] = time.perf_counter()

    def update(fraction: float, message: str) -> None:
        first = state["first"] = fraction if state["first"] is None else state["first"]  # a resumed step's start
        state["latest"] = (fraction, f"{label}: {message}{time_left(fraction, time.perf_counter() - began, first)}")
        drawn_at = state["drawn_at"]
        if drawn_at is not None and time.perf_counter() - drawn_at >= PROGRESS_INTERVAL_S:
            draw()

    timer = threading.Timer(FIRST_DRAW_S, draw)
    add_script_run_ctx(timer)
    timer.start()
    try:
        yield update
    finally:
        timer.cancel()
        with lock:
            state["open"] = False
            if state["drawn_at"] is not None:
                slot.empty()
                if stop_slot is not None:
                    stop_slot.empty()


@contextmanager
def counting_blocks(handles: ModelHandle | Sequence[ModelHandle], update: Progress | None,
                    forwards: int | None = 1, scorings: int = 0) -> Iterator[None]:
    """Inside, each block of the forwards of `handles` (one model, or the models a step runs
    one after another; a private copy made inside does not carry the hooks) moves the bar
    `update` draws: "k of n blocks" for a step that is one forward; over all of a known
    number of `forwards`; forward by forward where that number is not known (None). With
    `scorings`, the step also scores that many times a language model's logits, window by
    window (`lib.scoring.told_of_windows`), each weighing its readout's `readout_blocks`."""
    if update is None:
        yield
        return
    told = itertools.count()
    models = tuple(handles) if isinstance(handles, Sequence) else (handles,)
    first = models[0]
    weight = readout_blocks(first) if scorings else 0.0
    work = {"done": 0.0, "blocks": first.structure.n_layers}  # blocks' work done; blocks in a forward

    def total() -> float:
        return max((forwards or 0) * work["blocks"] + scorings * weight, 1e-9)

    def tell(k: int, n: int) -> None:
        done = next(told)  # blocks before this one, in every forward so far
        work["done"], work["blocks"] = work["done"] + 1, n
        if forwards is None:
            update(k / n, f"forward {done // n + 1}: {k} of {n} blocks")
        elif forwards == 1:
            update(min(1.0, work["done"] / total()) if scorings else k / n, f"{k} of {n} blocks")
        else:
            update(min(1.0, work["done"] / total()), f"forward {min(done // n + 1, forwards)} of {forwards}")

    def scored(k: int, n: int) -> None:
        work["done"] += weight / n
        if forwards is not None:
            update(min(1.0, work["done"] / total()), f"scoring: window {k} of {n}")

    with ExitStack() as stack:
        if forwards != 0:  # the block hooks hold each handle's lock: a step that only scores takes none
            for handle in models:
                stack.enter_context(handle.told_of_blocks(tell))
        if scorings:
            stack.enter_context(told_of_windows(scored))
        yield


def time_left(fraction: float, elapsed: float, start: float = 0.0) -> str:
    """" · about N s left" from the pace so far (`elapsed` seconds took the work from
    `start` to `fraction`), once there is a pace to go by (at least 5 % done and 2 s
    spent) and more than 5 s remain; else nothing."""
    if fraction - start < 0.05 or elapsed < 2 or fraction >= 1:
        return ""
    left = elapsed * (1 - fraction) / (fraction - start)
    if left <= 5:
        return ""
    return f" · {duration_text(left)} left"


def stored(key: tuple, compute: Callable[[Progress | None], T], label: str | None = None,
           stop: str | None = None, after: Callable[[], object] | None = None) -> T:
    """`STORE`'s value for `key`, or `compute(progress)`; with a `label`, under a progress
    bar (nothing is drawn when the value is already there). With `stop` (what a stop
    keeps, in words), the bar has a Stop button; once stopped, the step raises `Stopped`
    after drawing a notice, until this visitor goes on. `after`: the steps `compute` reads,
    run first under bars of their own (not inside this one's) when the value is not there."""
    found = STORE.get(key)
    if found is not None:
        return found
    if after is not None:
        after()

    def kept(update: Progress | None) -> T:
        value = compute(update)
        STORE.put(key, value)  # before the bar goes: a Stop clicked as it ends stops the run there
        return value

    if label is None:
        return kept(None)
    if stop is not None:
        return stoppable(key, kept, label, stop)
    with progress_bar(label) as update:
        return kept(update)


def stoppable(key: tuple, compute: Callable[[Progress], T], label: str, stop: str) -> T:
    """`compute(progress)` under a bar with a Stop (`stop`: what a stop keeps, in words). Once
    this visitor stopped the step at `key`, a notice and a button that goes on are drawn
    instead, and `Stopped` is raised, until they go on."""
    if is_stopped(key):
        with st.container():  # see the module's note on buttons that go
            st.info(f"{label}: stopped. {stop}")
            st.button("Go on", key=f"go_on_{next(_BUTTONS)}", on_click=go_on, args=(key,), icon=":material/play_arrow:")
        raise Stopped(label)
    with progress_bar(label, lambda: mark_stopped(key)) as update:
        return compute(update)


def partial(key: tuple) -> dict:
    """What a step stopped (or cut short) at `key` computed so far: a dict kept in the
    store beside its result, for the step to go on from."""
    so_far = STORE.get(key + ("so far",))
    if so_far is None:
        so_far = {}
        STORE.put(key + ("so far",), so_far)
    return so_far


def is_stopped(key: tuple) -> bool:
    return key in st.session_state.get(STOPPED, ())


def mark_stopped(key: tuple) -> None:
    """Mark the step at `key` stopped for this visitor (a Stop button's callback)."""
    st.session_state.setdefault(STOPPED, set()).add(key)


def go_on(key: tuple) -> None:
    """Let the step at `key` run again (a Go on button's callback)."""
    st.session_state.get(STOPPED, set()).discard(key)

