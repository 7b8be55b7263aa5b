"""Presenter friendliness: large text for a projector, per browser session, and the warm
server's controls and progress, all in the sidebar.

Large text scales the page's root font size (streamlit sizes its text in rem) and every
plotly figure's fonts. Figures are built by the analysis packages, which know nothing of a
session, and drawn by `plotly_chart` of streamlit's containers; `install` wraps that method
once per process so that, in a session that asked for large text, it draws a copy of the
figure with its fonts enlarged (the figure passed in is not changed; other sessions see
their figures as built).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import plotly.graph_objects as go
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from ui import warm

KEY = "presenter_large"  # the session's choice (the toggle's key)
ROOT_FONT_PX = 18  # streamlit sizes its text in rem of 16 px: 1.125x for every text
FONT_SCALE = 1.4  # a size a figure sets for labels around its plot: 10 px ticks become 14 px
BASE_FONT_PX = 19  # the figure's own font (axis titles, ticks, legend), 12 px by default
DENSE_TICKS = 12  # more explicit tick labels than this were sized to fit their axis: kept
# Metric values and buttons keep about their normal width: at 1280 px, three metrics share a
# half-page column and a button label sits in a narrow one (larger, they would be cut with "…").
CSS = f"""<style>
html {{ font-size: {ROOT_FONT_PX}px !important; }}
[data-testid="stMainBlockContainer"] {{ padding-left: 64px !important; padding-right: 64px !important; }}
[data-testid="stMetricValue"] {{ font-size: 1.9rem !important; }}
[data-testid="stMetricDelta"] div {{ font-size: 14px !important; }}
[data-testid="stMainBlockContainer"] button, [data-testid="stMainBlockContainer"] button * {{
  font-size: 16px !important; }}
[data-testid="stMainBlockContainer"] button {{ padding: 4px 10px !important; gap: 4px !important; }}
</style>"""


def large_text() -> bool:
    """Whether this session asked for large text."""
    return bool(st.session_state.get(KEY, False))


def _scaled(node: Any, in_font: bool = False) -> Any:
    """`node` (a figure's layout, or part of it) with every font size multiplied by
    FONT_SCALE, except the theme's (`template`), annotations' (subplot titles, sized to their
    column) and those of an axis with more than DENSE_TICKS explicit tick labels."""
    if isinstance(node, list):
        return [_scaled(v, in_font) for v in node]
    if not isinstance(node, dict):
        return node
    dense = len(node.get("tickvals") or ()) > DENSE_TICKS
    out = {}
    for key, value in node.items():
        if in_font and key == "size" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = round(value * FONT_SCALE, 1)
        elif key in ("template", "annotations") or (dense and key == "tickfont"):
            out[key] = value
        else:
            out[key] = _scaled(value, key.endswith("font"))
    return out


def enlarged(figure: Any) -> Any:
    """A plotly figure's dict with larger labels around its plots (axis titles, ticks,
    legend, colour bars; at least BASE_FONT_PX), for `plotly_chart`; anything else as it is.
    Text inside the plot area (heat-map cells, node names, bar values) keeps its size: it is
    placed to fit the data."""
    if not isinstance(figure, go.Figure):
        return figure
    spec = figure.to_dict()
    layout = spec["layout"] = _scaled(spec.get("layout", {}))
    font = layout.setdefault("font", {})
    font["size"] = max(font.get("size", 0), BASE_FONT_PX)
    for trace in spec.get("data", []):
        if trace.get("text") is not None or trace.get("texttemplate") is not None:
            trace.setdefault("textfont", {}).setdefault("size", 12)  # not the larger layout font
        if isinstance(trace.get("colorbar"), dict):
            trace["colorbar"] = _scaled(trace["colorbar"])
    if isinstance(layout.get("height"), (int, float)):  # the same plot area under larger labels
        layout["height"] = round(layout["height"] * 1.15)
    return spec


def install() -> None:
    """Once per process: `st.plotly_chart` and every container's `plotly_chart` draw with
    larger fonts in a session that chose large text (`KEY`)."""
    if getattr(DeltaGenerator.plotly_chart, "_presenter", False):
        return
    original = DeltaGenerator.plotly_chart

    @functools.wraps(original)
    def plotly_chart(self: DeltaGenerator, figure_or_data: Any, *args: Any, **kwargs: Any) -> Any:
        if large_text():
            figure_or_data = enlarged(figure_or_data)
        return original(self, figure_or_data, *args, **kwargs)

    plotly_chart._presenter = True  # type: ignore[attr-defined]
    DeltaGenerator.plotly_chart = plotly_chart  # type: ignore[method-assign]
    st.plotly_chart = st._main.plotly_chart  # bound when streamlit was imported: bind it again


def sidebar() -> None:
    """The Presenter expander (large text; warming every page now) and a slot for the
    warm-up's progress. Call in app.py before the page runs."""
    install()
    with st.sidebar.expander("Presenter"):
        st.toggle("Large text for a projector", key=KEY,
                  help="Larger text and chart labels in this browser only, for a projector or a big room.")
        if not warm.WARMER.started and st.button(
                "Warm every page now", width="stretch",
                help="Computes every page's results for the bundled models in the background, so that a first "
                     "visit of each page takes seconds: a few minutes of the server's CPU, once. Or start the "
                     f"server with {warm.ENV}=1."):
            warm.WARMER.start(warm.bundled_specs())
    if large_text():
        st.html(CSS)
    _RUN.slot = st.sidebar.container()
    if warm.WARMER.started or warm.WARMER.problems:
        _status(_RUN.slot)


def warm_after_first_page() -> None:
    """Start the warm-up a server was started for (LAYERSCOPE_WARM), once per process, after
    the first visit's page is drawn, and show its progress in the slot `sidebar` left."""
    if warm.WARMER.started or not warm.start_from_environment():
        return
    slot, _RUN.slot = getattr(_RUN, "slot", None), None
    if slot is not None:
        _status(slot)


_RUN = threading.local()  # this script run's slot (each session's run has its own thread)


def _status(slot: DeltaGenerator) -> None:
    """The warm-up's progress in one line, redrawn every 2 s while it runs (a fragment, which
    never interrupts a page's run)."""
    with slot:
        if not warm.WARMER.started:  # LAYERSCOPE_WARM named something else
            st.warning(warm.WARMER.problems[0])
        elif warm.WARMER.finished:
            _progress_line()
        else:
            st.fragment(_progress_line, run_every=2)()


def _progress_line() -> None:
    (st.warning if warm.WARMER.finished and warm.WARMER.problems else st.caption)(warm.WARMER.status())
