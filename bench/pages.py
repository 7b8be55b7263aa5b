"""Page rows: what a user waits for in a real browser, against the computation it needs.

Each repetition starts a fresh `streamlit run app.py` (`tools.serve.app_server`) and
drives headless Chromium in a fresh browser context (empty cache, as on a first visit);
the reference runs in a fresh Python subprocess, so both start equally cold. Measured
and reference alternate in order, as in `bench.common.measure`.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from bench.common import Row, Setup, Timing
from tools.serve import CHROMIUM, ROOT, app_server, chromium

MODEL = "zoo:code-lm"  # the model the app opens on
TIMEOUT_MS = 600_000

# The cold start's unavoidable work, in one process: import, load the model, evaluate its batch
# with the latency as the page measures it (the median of warm forwards).
MINIMUM_WORK = f"""
from lib import data, latency, metrics
from lib.models import load_model

handle = load_model({MODEL!r})
metrics.evaluate(handle, data.default_batch(handle), latency_repeats=latency.LATENCY_REPEATS)
"""

# build_report alone, timed inside a process that has already done what the Model page
# does before one clicks on Redundancy (load, evaluate), so its first-call costs are paid.
BUILD_REPORT = f"""
import time

from analysis.redundancy.report import build_report
from lib import data, metrics
from lib.models import load_model

handle = load_model({MODEL!r})
batch = data.default_batch(handle)
metrics.evaluate(handle, batch)
start = time.perf_counter()
build_report(handle, batch)
print(time.perf_counter() - start)
"""

# Every chart on the Redundancy page of an LM has been drawn by plotly (an svg with its
# plot area), and nothing is left from the Model page (its title is gone). textContent, not
# innerText: reading innerText lays the page out.
REDUNDANCY_CHARTS = 6
_REDUNDANCY_DRAWN = """n => {
  const titles = [...document.querySelectorAll('h1')].map(h => h.textContent);
  if (titles.some(t => t.startsWith('Model ·')) || !titles.some(t => t.startsWith('Layer redundancy'))) return false;
  const charts = [...document.querySelectorAll('.js-plotly-plot')];
  return charts.length >= n && charts.every(c => c.querySelector('.main-svg .plot, .main-svg .cartesianlayer'));
}"""
_MODEL_DRAWN = """() => [...document.querySelectorAll('h1')].some(h => h.textContent.startsWith('Model ·'))
  && document.querySelector('[data-testid="stMetricValue"]') !== null"""
_METRIC_DRAWN = """() => document.querySelector('[data-testid="stMetricValue"]') !== null"""


def _when(page, predicate: str, arg=None) -> None:
    """Return once `predicate(arg)` (JavaScript) holds in the page, testing it at each change of
    the page's DOM (a MutationObserver), not at every animation frame as Playwright's waits do:
    that polling cost Chromium about 0.25 s of CPU per 3 s of waiting here (measured on the
    Model page), CPU that on two cores the computation being timed shares."""
    page.evaluate("""([test, arg, ms]) => new Promise((resolve, reject) => {
      const holds = eval(test);
      const check = () => { if (holds(arg)) { observer.disconnect(); clearTimeout(timer); resolve(true); } };
      const observer = new MutationObserver(check);
      const timer = setTimeout(() => { observer.disconnect(); reject(new Error('not drawn in time')); }, ms);
      observer.observe(document, {childList: true, subtree: true, characterData: true});
      check();
    })""", [predicate, arg, TIMEOUT_MS])


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True)


def minimum_work() -> float:
    """Seconds from starting a Python process to the end of its unavoidable work."""
    start = time.perf_counter()
    _python(MINIMUM_WORK)
    return time.perf_counter() - start


def build_report_seconds() -> float:
    """Seconds `build_report` takes on the model, in a fresh process after evaluating it."""
    return float(_python(BUILD_REPORT).stdout.strip().splitlines()[-1])


@contextmanager
def _browser() -> Iterator:
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"The pages rows drive Chromium, and {CHROMIUM} is missing (apt-get install -y chromium).")
    with chromium() as browser:
        yield browser


def _metrics_drawn(page) -> None:
    _when(page, _METRIC_DRAWN)


def cold_start(browser, script: str = "app.py") -> float:
    """Seconds from `streamlit run <script>` to its first metric drawn in the browser (the
    app's: the Model page's metrics)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()  # the browser is open before the app starts, as a user's would be
        start = time.perf_counter()
        with app_server(timeout_s=TIMEOUT_MS / 1000, script=script) as url:
            page.goto(url)
            _metrics_drawn(page)
            return time.perf_counter() - start
    finally:
        context.close()


# The smallest Streamlit app that draws what the cold start waits for: its first paint is what
# any Streamlit app costs (server start, the page's scripts, one rerun), whatever it computes.
EMPTY_APP = 'import streamlit as st\n\nst.title("Model")\nst.metric("ready", 1)\n'


def empty_app_first_paint(browser) -> float:
    with tempfile.TemporaryDirectory() as folder:
        script = os.path.join(folder, "empty_app.py")
        with open(script, "w") as f:
            f.write(EMPTY_APP)
        return cold_start(browser, script)


def _redundancy_visit(page) -> float:
    """Seconds from clicking "Redundancy" on the drawn Model page to every chart of the
    Redundancy page drawn; then back to the Model page, drawn."""
    start = time.perf_counter()
    page.get_by_role("link", name="Redundancy").click()
    _when(page, _REDUNDANCY_DRAWN, REDUNDANCY_CHARTS)
    seconds = time.perf_counter() - start
    page.get_by_role("link", name="Model", exact=True).click()
    _when(page, _MODEL_DRAWN)
    return seconds


def _model_page(context, url: str):
    page = context.new_page()
    page.goto(url)
    _metrics_drawn(page)
    page.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=TIMEOUT_MS)  # its last chart
    return page


def redundancy_visits(browser) -> tuple[float, float, float]:
    """On a fresh server: the first visit to the Redundancy page (Model page drawn, nothing
    else computed); the same clicks in a fresh browser context, everything cached (what
    drawing the page for the first time in a tab costs by itself); and the page again in the
    first tab (the browser's code for its charts warm by then, so this redraw is cheaper
    than any first visit's can be)."""
    contexts = [browser.new_context(viewport={"width": 1400, "height": 1000}) for _ in range(2)]
    try:
        with app_server(timeout_s=TIMEOUT_MS / 1000) as url:
            page = _model_page(contexts[0], url)
            first = _redundancy_visit(page)
            fresh = _redundancy_visit(_model_page(contexts[1], url))
            return first, fresh, _redundancy_visit(page)
    finally:
        for context in contexts:
            context.close()


def _interleaved(fn: Callable[[], float], reference: Callable[[], float], repeats: int) -> Timing:
    """`repeats` pairs (fn, reference), the order within a pair alternating; each
    callable returns its own seconds (page times exclude starting the browser)."""
    return _pairs(lambda: (fn(), 0.0), reference, repeats)


def _pairs(measured: Callable[[], tuple[float, float]], reference: Callable[[], float], repeats: int) -> Timing:
    """`repeats` pairs, the order within a pair alternating: `measured()` gives (seconds,
    a part of the reference measured in the same run), `reference()` the rest of the reference."""
    times, ref = [], []
    for k in range(repeats):
        if k % 2 == 0:
            seconds, part = measured()
            rest = reference()
        else:
            rest = reference()
            seconds, part = measured()
        times.append(seconds)
        ref.append(part + rest)
    return Timing(tuple(times), tuple(ref))


def cold_start_row(setup: Setup) -> Row:
    with _browser() as browser:
        t = _pairs(lambda: (cold_start(browser), empty_app_first_paint(browser)), minimum_work, setup.repeats)
    return Row.timed("cold start to model page / (minimum work + an empty app's first paint)", t,
                     f"{MODEL}; streamlit run + Chromium until the metrics are drawn, vs one process that imports, "
                     "loads and evaluates plus an empty Streamlit app's first paint in the same browser "
                     "(target <= 1.15)")


def redundancy_row(setup: Setup) -> Row:
    seen = []  # (first, fresh tab, first tab again) of each repetition

    def visits() -> tuple[float, float]:
        seen.append(redundancy_visits(browser))
        return seen[-1][0], seen[-1][1]

    with _browser() as browser:
        t = _pairs(visits, build_report_seconds, setup.repeats)
    # the same first visits against build_report + the page redrawn in the first tab
    warm = statistics.median(first / (ref - fresh + again) for (first, fresh, again), ref in zip(seen, t.reference))
    return Row.timed("redundancy page first visit / (build_report + the page drawn from cache)", t,
                     f"{MODEL}; click to all {REDUNDANCY_CHARTS} charts drawn, vs build_report in a process that "
                     "has evaluated the model plus the same clicks in a fresh tab of the same browser with every "
                     "result cached (target <= 1.15; the page reads the residual pass its Model page's forward "
                     "recorded, build_report runs a pass of its own); against the page redrawn in the first tab "
                     f"instead: {warm:.3f}")


ROWS: tuple[Callable[[Setup], Row], ...] = (cold_start_row, redundancy_row)
