"""A warm server: every page's heavy results for the bundled models, computed ahead of a
class by one background thread of the server process.

The thread calls the very cached functions each page calls, with the controls a first visit
shows (the default skip, prompt, channel, image, rank), so it fills the caches the pages
read: `ui.store.STORE` (the base outputs and their scores, the redundancy pass and sweep,
circuits, probes, linear maps ...), the `st.cache_data` functions of `ui.cache` (batch, the
load check) and
the base models' `st.cache_resource`. These caches are process-wide, so a thread without a
script context fills and reads them as a page does; the spinners inside the cached
functions draw nothing there (their "missing ScriptRunContext" warnings are filtered out).

Started by `LAYERSCOPE_WARM=1 streamlit run app.py` at the first visit, once that visit's
page is drawn (the default model's Model page never waits for it), or on demand from the
sidebar's Presenter expander. Bounded: only the bundled models, the default model first; at
the end the default model's results are read again, so the shared caches' eviction (least
recently used first) takes other models' results before the default's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from analysis.channels.circuits import MODES
from analysis.channels.heads import HeadEdit
from analysis.predict import next_tokens
from analysis.redundancy import report as rr
from analysis.redundancy.similarity import DEFAULT_SKIP
from lib.errors import CapabilityError, LayerScopeError
from lib.handle import ModelHandle
from lib.models import zoo_names
from ui import channels, interpreter, redundancy, representations
from ui.cache import baseline, baseline_spread, prepared_base, verified
from ui.model import base_latency
from ui.session import DEFAULT_SPEC, ENV_TRUE, LoadRequest, load_base

ENV = "LAYERSCOPE_WARM"
THREAD_NAME = "layerscope-warm"
# The pages' first-visit controls (views/*.py): the prompts the text areas start with
TEXT_PROMPT = "def fibonacci(n):\n    "
REPEATED_PROMPT = "t5 t9 t2 t7 t5 t9"
IMAGE_INDEX, OUTPUT_PIXEL = 0, (3, 3)  # the Interpreter's first image; a denoiser's first output pixel

log = logging.getLogger(__name__)


def model_page(handle: ModelHandle) -> None:
    """The sidebar's load check, the baseline with its intervals, the timed latency."""
    verified(handle)
    baseline(handle)
    baseline_spread(handle)
    base_latency(handle, 0)


def redundancy_page(handle: ModelHandle) -> None:
    """Statistics, lens and drop sweep at the default skip, and the default drop's check."""
    report = redundancy.redundancy(handle, DEFAULT_SKIP)  # every part, as the page assembles it
    if len(report.sweep.dropped) < 2:  # the page offers the single drop and stops
        return
    granularity = "sublayers" if report.similarity is not None and handle.structure.d_mlp else "blocks"
    by = "similarity" if len(rr.candidates(report, granularity, "measured")) > 1 else "measured"
    ranked = rr.candidates(report, granularity, by)
    if ranked:
        redundancy.drop_check(handle, DEFAULT_SKIP, tuple(ranked[:1]))


def channels_page(handle: ModelHandle) -> None:
    """Circuits, composition, head roles, the example prompt's patterns and the cut of the
    strongest channel's writer."""
    if handle.kind != "causal-lm":
        return
    channels.circuits(handle)
    comp, _ = channels.composition(handle), channels.head_roles(handle)
    strongest = max((comp.strongest(m, 1)[0] for m in MODES if comp.strongest(m, 1)), key=lambda c: c.relative,
                    default=None)
    if strongest is None:
        return
    pair = comp.strongest(strongest.mode, 30)[0]
    prompt = channels.example_prompt(handle)
    channels.prompt_patterns(handle, prompt)
    channels.intervention(handle, HeadEdit(*pair.writer, (), 0.0), pair.reader, prompt)


def interpreter_page(handle: ModelHandle) -> None:
    """The exact map and captum beside it: for a language model on the example prompt's top
    next token, for an image model on the first evaluation image."""
    if handle.kind == "causal-lm":
        prompt = REPEATED_PROMPT if handle.eval_task == "repeated-tokens" else TEXT_PROMPT
        token = next_tokens(handle, prompt, k=10).token_ids[0]
        interpreter.token_contributions(handle, prompt, token, None)
        interpreter.token_comparison(handle, prompt, token, None)
        return
    linear = interpreter.linear_map(handle, IMAGE_INDEX)
    if len(linear.output_shape) == 1:  # a classifier: the predicted class
        target = int(linear.output.argmax())
    else:
        target = OUTPUT_PIXEL[0] * linear.output_shape[-1] + OUTPUT_PIXEL[1]
    interpreter.image_comparison(handle, IMAGE_INDEX, target)


def representations_page(handle: ModelHandle) -> None:
    """The probes at every depth (a language model's tokens, an image model's stages) and
    the weights across depth at rank 0."""
    probes = representations.probes if handle.kind == "causal-lm" else representations.stage_probes
    parts = [lambda h: representations.depth(h, 0)]
    if handle.eval_task != "repeated-tokens":  # the page shows no probes for a model that cannot read text
        parts.insert(0, probes)
    for compute in parts:
        try:
            compute(handle)
        except CapabilityError:  # the page says so and shows the other part
            pass


def lab_page(handle: ModelHandle) -> None:
    """What every session's lab starts from (`ui.session.session_lab`): the base model's
    outputs on its evaluation batch, prepared for comparisons. The lab itself (its latency
    timing, its scores) is each session's own."""
    prepared_base(handle)


PAGES: dict[str, Callable[[ModelHandle], None]] = {
    "Model": model_page, "Redundancy": redundancy_page, "Channels": channels_page,
    "Interpreter": interpreter_page, "Representations": representations_page, "Compression lab": lab_page,
}


def bundled_specs(setting: str = "1") -> list[str]:
    """The bundled models to warm, the default first: all of them for a true `setting`
    ("1", "true", ...), else those named in it, comma-separated (`code-lm,induction-2l`).
    A name that is not a bundled model is refused in words."""
    names = [f"zoo:{n}" for n in zoo_names()]
    if setting.strip().lower() in ENV_TRUE:
        chosen = names
    else:
        chosen = [s if s.startswith("zoo:") else f"zoo:{s}" for s in (p.strip() for p in setting.split(",")) if s]
        unknown = [s for s in chosen if s not in names]
        if unknown:
            raise LayerScopeError(f"{ENV} names {', '.join(unknown)}, which are not bundled models; it takes 1 "
                                  f"(all of them) or some of {', '.join(n[4:] for n in names)}, comma-separated.")
    return sorted(dict.fromkeys(chosen), key=lambda s: s != DEFAULT_SPEC)


def warm(specs: list[str], on_step: Callable[[str, str], None] | None = None) -> list[str]:
    """Compute every page's first-visit results for each model in `specs`, in order;
    `on_step(spec, page)` after each page. Returns what could not be warmed, in words (a
    page that refuses a model, as the page itself would, is not warmed and not reported)."""
    problems = []
    for spec in specs:
        try:
            handle = load_base(LoadRequest(spec))
        except Exception as e:  # noqa: BLE001 - a model that cannot load is skipped, the rest warm
            problems.append(f"{spec}: {e}")
            handle = None
        for page, compute in PAGES.items():
            if handle is not None:
                try:
                    compute(handle)
                except CapabilityError:  # the page shows the same refusal
                    pass
                except Exception as e:  # noqa: BLE001 - one page's failure must not stop the others
                    log.exception("warming %s for %s failed", page, spec)
                    problems.append(f"{page} · {spec}: {e}")
            if on_step is not None:
                on_step(spec, page)
    return problems


@dataclass
class Warmer:
    """The server's one warm-up: its steps (model x page), how far it got, what failed."""

    specs: list[str] = field(default_factory=list)
    done: int = 0
    current: str = ""
    problems: list[str] = field(default_factory=list)
    began: float | None = None
    seconds: float | None = None  # set when finished
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def total(self) -> int:
        return len(self.specs) * len(PAGES)

    @property
    def started(self) -> bool:
        return self.began is not None

    @property
    def finished(self) -> bool:
        return self.seconds is not None

    def start(self, specs: list[str]) -> bool:
        """Start warming `specs` in a background thread, unless a warm-up already started
        in this process (then False)."""
        with self._lock:
            if self.started:
                return False
            self.specs, self.began = list(specs), time.perf_counter()
        threading.Thread(target=self._run, name=THREAD_NAME, daemon=True).start()
        return True

    def _run(self) -> None:
        order = [f"{page} · {spec}" for spec in self.specs for page in PAGES]

        def step(spec: str, page: str) -> None:
            self.done += 1
            self.current = order[self.done] if self.done < len(order) else ""

        self.current = order[0] if order else ""
        try:
            self.problems = warm(self.specs, step)
            if DEFAULT_SPEC in self.specs and len(self.specs) > 1:
                warm([DEFAULT_SPEC])  # all hits: the default's results become the most recently used
                interpreter.working_copy(load_base(LoadRequest(DEFAULT_SPEC)))  # the float64 copy: one is kept
        except Exception as e:  # noqa: BLE001 - a thread's error would otherwise vanish
            log.exception("warming failed")
            self.problems.append(str(e))
        finally:
            self.seconds = time.perf_counter() - (self.began or 0.0)

    def status(self) -> str:
        """One line for the sidebar."""
        if self.finished:
            text = f"Warm: every page of {len(self.specs)} bundled model(s) computed in {self.seconds:.0f} s."
            return text + (f" Not warmed: {'; '.join(self.problems)}." if self.problems else "")
        return f"Warming: {self.done} of {self.total} done (now: {self.current})."


WARMER = Warmer()


class _QuietWarmThread(logging.Filter):
    """Drops streamlit's "missing ScriptRunContext" warning for the warm thread only: it has
    no page to draw the cached functions' spinners on, by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.args and record.args[0] == THREAD_NAME)


_CONTEXT_LOGGER = "streamlit.runtime.scriptrunner_utils.script_run_context"
if not any(isinstance(f, _QuietWarmThread) for f in logging.getLogger(_CONTEXT_LOGGER).filters):
    logging.getLogger(_CONTEXT_LOGGER).addFilter(_QuietWarmThread())


def start_from_environment() -> bool:
    """Start the warm-up if the server was started with LAYERSCOPE_WARM set and none has
    started in this process; True if this call started it. A setting naming something
    other than bundled models is kept in `WARMER.problems` and logged."""
    setting = os.environ.get(ENV, "").strip()
    if not setting or setting.lower() in {"0", "false", "no", "off"} or WARMER.started or WARMER.problems:
        return False
    try:
        return WARMER.start(bundled_specs(setting))
    except LayerScopeError as e:
        log.error("%s", e)
        WARMER.problems.append(str(e))
        return False
