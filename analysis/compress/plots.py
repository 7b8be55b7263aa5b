"""Figures of the compression lab (`lab`, `history`): the history of recipes tried with
its Pareto frontier, and what the edits did to each layer. Layout only, no streamlit;
conventions as in `analysis.plots` (no titles where the page's header says it, integer
axes tick whole numbers)."""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go

from analysis.compress.history import LabPoint, LayerSummary, higher_is_better
from analysis.metric_text import metric_value
from analysis.plots import integer_axis
from lib.metrics import LABELS

GREY, FRONT, CURRENT, REMOVED = "#9aa0a6", "#d62728", "#1f77b4", "#c7c7c7"
COST_AXES = {"size_bits": "size (MiB)", "latency_ms": "latency relative to the base"}
MS_AXIS = "latency (ms)"  # a lab that does not time against the base: each point's own milliseconds


def _timed(points: Sequence[LabPoint]) -> bool:
    return all(p.latency is not None for p in points)


def cost_value(point: LabPoint, cost: str) -> float:
    """The x value of a point: size in MiB, or latency relative to the base (both timed in
    the same moment, `LabPoint.cost`; milliseconds where the lab does not time)."""
    value = point.cost(cost)
    return value / 8 / 2**20 if cost == "size_bits" else value


def _latency_bars(points: Sequence[LabPoint]) -> dict | None:
    """Asymmetric x error bars from each point's latency interval (None without one)."""
    if not _timed(points):
        return None
    return dict(type="data", symmetric=False, array=[p.latency.high - p.latency.ratio for p in points],
                arrayminus=[p.latency.ratio - p.latency.low for p in points], color=GREY, thickness=1, width=3)


def _quality_bars(points: Sequence[LabPoint], quality: str) -> dict | None:
    """Asymmetric y error bars from each point's bootstrap interval of the quality; none for
    a point without one (measured in an earlier session: its intervals were not kept), and
    None when no point has one."""
    spans = [p.spread.intervals.get(quality) if p.spread is not None else None for p in points]
    if all(span is None for span in spans):
        return None
    values = [getattr(p.metrics, quality) for p in points]
    return dict(type="data", symmetric=False, color=GREY, thickness=1, width=3,
                array=[None if span is None else max(span[1] - v, 0.0) for span, v in zip(spans, values)],
                arrayminus=[None if span is None else max(v - span[0], 0.0) for span, v in zip(spans, values)])


def _hover(point: LabPoint, cost: str, quality: str) -> str:
    m = point.metrics
    lines = [f"<b>step {point.step}</b>: {point.label}",
             f"{LABELS[quality]}: {metric_value(quality, getattr(m, quality))}"]
    if point.spread is not None and quality in point.spread.intervals:
        low, high = point.spread.intervals[quality]
        lines[-1] += f" (95 %: {metric_value(quality, low)} – {metric_value(quality, high)})"
    if cost == "latency_ms" and point.latency is not None:
        lines.append(f"latency: {point.latency.text()} against the base")
        if point.latency.predicted is not None:
            lines.append(f"FLOP prediction: {point.latency.predicted - 1:+.0%}")
    elif cost == "latency_ms":
        lines.append(f"{MS_AXIS}: {m.latency_ms:.4g}")
    else:
        lines.append(f"{COST_AXES[cost]}: {cost_value(point, cost):.4g}")
    if m.kl_to_base is not None:
        lines.append(f"KL to base: {m.kl_to_base:.3g} nats")
    lines.append("click to restore this recipe")
    return "<br>".join(lines)


def history_scatter(points: Sequence[LabPoint], cost: str, quality: str, frontier: Sequence[int],
                    current: int) -> go.Figure:
    """Every recipe tried (grey), the Pareto frontier (red line), the base (diamond) and
    the current recipe (blue star). Each marker's customdata is its history step, so a
    click can restore it."""
    by_step = {p.step: p for p in points}
    worse = "lower" if higher_is_better(quality) else "higher"

    def trace(steps: Sequence[int], **style) -> go.Scatter:
        chosen = [by_step[s] for s in steps]
        if style.get("mode") == "markers" and style.get("name") == "recipes tried":
            if cost == "latency_ms":
                style["error_x"] = _latency_bars(chosen)
            style["error_y"] = _quality_bars(chosen, quality)
        return go.Scatter(x=[cost_value(p, cost) for p in chosen], y=[getattr(p.metrics, quality) for p in chosen],
                          customdata=[p.step for p in chosen], hovertext=[_hover(p, cost, quality) for p in chosen],
                          hoverinfo="text", **style)

    fig = go.Figure([
        trace([p.step for p in points], mode="markers", name="recipes tried",
              marker=dict(color=GREY, size=9, line=dict(width=1, color="white"))),
        trace(list(frontier), mode="lines+markers", name="Pareto frontier",
              line=dict(color=FRONT, width=2), marker=dict(color=FRONT, size=10)),
        trace([0], mode="markers+text", name="base", text=["base"], textposition="middle left", cliponaxis=False,
              marker=dict(symbol="diamond", size=13, color="black")),
        trace([current], mode="markers", name="current", marker=dict(symbol="star", size=18, color=CURRENT,
                                                                     line=dict(width=1, color="white"))),
    ])
    timed = cost != "latency_ms" or _timed(points)
    fig.update_layout(xaxis_title=COST_AXES[cost] if timed else MS_AXIS,
                      yaxis_title=f"{LABELS[quality]} ({worse} is worse)",
                      height=420, margin=dict(t=30, b=50), clickmode="event+select", dragmode="pan",
                      legend=dict(orientation="h", y=1.08, x=0))
    fig.update_xaxes(rangemode="tozero")  # a size or a latency: never a negative axis around a lone point
    if cost == "latency_ms" and timed:
        fig.add_vline(x=1.0, line=dict(color=GREY, dash="dot", width=1))  # the base's latency
    if quality == "accuracy":
        fig.update_yaxes(range=[0, 1.04])
    elif len(points) == 1:  # one point: a band around it, not plotly's ±1
        y = getattr(points[0].metrics, quality)
        fig.update_yaxes(range=[y * 0.9, y * 1.1] if y > 0 else None)
    return fig


def sparsity_bars(summary: LayerSummary) -> go.Figure:
    """Share of exact zeros per linear layer (blue); removed layers as full grey bars.
    Bars carry their value as text while there are few enough to read it."""
    names = list(summary.names)
    hover = [f"{n}<br>{'removed' if gone else f'sparsity {s:.1%}'}<br>nonzero weights kept: {k:.1%} of the base's"
             for n, s, k, gone in zip(names, summary.sparsity, summary.kept, summary.removed)]
    labelled = len(names) <= 16
    fig = go.Figure()
    for removed, name, color in ((False, "sparsity", CURRENT), (True, "removed", REMOVED)):
        index = [i for i, gone in enumerate(summary.removed) if gone == removed]
        if not index and removed:
            continue
        fig.add_trace(go.Bar(
            x=[names[i] for i in index], y=[100 * summary.sparsity[i] for i in index], name=name,
            marker_color=color, hovertext=[hover[i] for i in index], hoverinfo="text",
            text=["removed" if removed else f"{summary.sparsity[i]:.0%}" for i in index] if labelled else None,
            textposition="outside", cliponaxis=False))
    fig.update_layout(yaxis=dict(title="sparsity (% of weights exactly 0)", range=[0, 110]),
                      xaxis=dict(title="linear layer", tickangle=-45 if len(names) > 8 else 0,
                                 categoryorder="array", categoryarray=names, automargin=True),
                      height=420 if len(names) > 8 else 380, margin=dict(t=30, b=40),
                      bargap=0.25 if len(names) > 1 else 0.7, barmode="overlay",
                      legend=dict(orientation="h", y=1.1, x=0))
    return fig


def heads_bars(summary: LayerSummary) -> go.Figure:
    """Attention heads each block still computes, against the base's count (dashed)."""
    if summary.heads_kept is None:
        raise ValueError("Heads are counted for language models only.")
    layers = list(range(len(summary.heads_kept)))
    colors = [REMOVED if k == 0 else CURRENT for k in summary.heads_kept]
    # numbers only on blocks that lost heads: the dashed line already says what a full block has
    text = [str(k) if k < summary.n_heads else "" for k in summary.heads_kept]
    fig = go.Figure(go.Bar(x=layers, y=list(summary.heads_kept), marker_color=colors,
                           text=text, textposition="outside", cliponaxis=False,
                           hovertemplate="block %{x}: %{y} head(s) kept<extra></extra>"))
    fig.add_hline(y=summary.n_heads, line_dash="dash", line_color=GREY,
                  annotation_text=f"base: {summary.n_heads} heads", annotation_position="top left")
    fig.update_layout(xaxis=dict(title="block", **integer_axis(len(layers))),
                      yaxis=dict(title="heads kept", range=[0, summary.n_heads * 1.25], **integer_axis(
                          summary.n_heads + 1)),
                      height=320, margin=dict(t=30, b=40), bargap=0.25 if len(layers) > 1 else 0.7)
    return fig
