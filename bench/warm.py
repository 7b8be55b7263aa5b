"""Warm-server row: a class's first visit to every page of the default model once the
server has warmed (`LAYERSCOPE_WARM`, `ui.warm`), against the same visits on a server that
has not.

Each repetition starts a fresh `streamlit run app.py` (`tools.serve.app_server`). The
teacher's browser opens it first (that visit draws the Model page and, on the warm server,
starts the warm-up); once the sidebar says the warm-up is done (the reference: once the Model
page is drawn), a student's browser, a fresh context with an empty cache, opens the app and
clicks through every page. Each page counts from the click (the Model page: from opening the
address) to its script finished with every chart drawn. The issue's target is every page
under 5 s on this machine; the row prints each page's median seconds and the slowest.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

from bench.common import Row, Setup, Timing
from bench.pages import MODEL, TIMEOUT_MS, _browser, _interleaved
from tools.serve import app_server

ENV = "LAYERSCOPE_WARM"  # ui.warm.ENV (the bench process does not import the app)

WARMED = MODEL.removeprefix("zoo:")  # the bench warms the default model alone: its pages are what it times
# (link in the menu, how the page's title starts)
PAGES = (("Redundancy", "Layer redundancy"), ("Channels", "Attention channels"),
         ("Interpreter", "Linear interpreter"), ("Representations", "Representations"),
         ("Compression lab", "Compression lab"), ("Glossary", "Glossary"))
TARGET_S = 5.0

# The page's script has finished (streamlit marks its root), its title is the one expected,
# and every plotly chart on it has drawn its plot area.
_DONE = """title => {
  const app = document.querySelector('[data-testid="stApp"]');
  if (!app || app.getAttribute('data-test-script-state') !== 'notRunning') return false;
  if (![...document.querySelectorAll('h1')].some(h => h.innerText.startsWith(title))) return false;
  return [...document.querySelectorAll('.js-plotly-plot')].every(
    c => c.querySelector('.main-svg .plot, .main-svg .cartesianlayer, .main-svg .layer-above'));
}"""
_WARM_DONE = """() => [...document.querySelectorAll('[data-testid="stSidebar"] p')]
  .some(p => p.innerText.startsWith('Warm:'))"""


def _wait(page, title: str) -> None:
    page.wait_for_function(_DONE, arg=title, timeout=TIMEOUT_MS, polling=100)


def _visits(browser, warm: bool) -> dict[str, float]:
    """On a fresh server (warmed or not), seconds of a fresh session's first visit to every page."""
    if warm:
        os.environ[ENV] = WARMED  # app_server passes this process's environment on
    try:
        with app_server(timeout_s=TIMEOUT_MS / 1000) as url:
            teacher = browser.new_context(viewport={"width": 1280, "height": 720})
            try:
                first = teacher.new_page()
                first.goto(url)
                _wait(first, "Model ·")
                if warm:
                    first.wait_for_function(_WARM_DONE, timeout=TIMEOUT_MS, polling=1000)
            finally:
                teacher.close()
            student = browser.new_context(viewport={"width": 1280, "height": 720})
            try:
                page = student.new_page()
                seconds = {}
                start = time.perf_counter()
                page.goto(url)
                _wait(page, "Model ·")
                seconds["Model"] = time.perf_counter() - start
                for link, title in PAGES:
                    start = time.perf_counter()
                    page.get_by_role("link", name=link).click()
                    page.wait_for_timeout(50)  # the click's rerun request reaches the server
                    _wait(page, title)
                    seconds[link] = time.perf_counter() - start
                return seconds
            finally:
                student.close()
    finally:
        os.environ.pop(ENV, None)


def warm_visits_row(setup: Setup) -> Row:
    warm, cold = [], []

    def visits(store: list, is_warm: bool, browser) -> Callable[[], float]:
        def run() -> float:
            store.append(_visits(browser, is_warm))
            return sum(store[-1].values())
        return run

    with _browser() as browser:
        t: Timing = _interleaved(visits(warm, True, browser), visits(cold, False, browser), setup.repeats)
    names = [name for name, _ in (("Model", ""), *PAGES)]
    median = {n: statistics.median(v[n] for v in warm) for n in names}
    slowest = max(median, key=median.get)
    per_page = ", ".join(f"{n} {median[n]:.1f} s" for n in names)
    cold_per_page = ", ".join(f"{n} {statistics.median(v[n] for v in cold):.1f} s" for n in names)
    return Row.timed("first visit of every page warmed / not warmed", t,
                     f"{MODEL}, every page's first visit in a fresh session, summed; after LAYERSCOPE_WARM={WARMED}: "
                     f"{per_page} (slowest {slowest} {median[slowest]:.1f} s; target every page < {TARGET_S:.0f} s); "
                     f"not warmed: {cold_per_page}")


ROWS: tuple[Callable[[Setup], Row], ...] = (warm_visits_row,)
