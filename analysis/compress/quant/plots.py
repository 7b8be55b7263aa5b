"""Figures of quantization (`quantize`, `mixed_precision`): a layer's weight
histogram with the format's grid over it, per-layer sensitivity with the chosen formats,
LLM.int8's outlier columns. Layout
only, no streamlit; conventions as in `analysis.plots`."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from analysis.compress.quant.mixed_precision import Allocation, Sensitivity
from analysis.compress.quant.quantize import GridHistogram, OutlierReport
from analysis.plots import _bargap, value_axis

BARS, GRID, RTN = "#1f77b4", "#d62728", "#9aa0a6"
GRID_LINE = "rgba(214,39,40,0.45)"  # GRID, see-through: a bar under a grid line stays visible
FORMAT_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_MAX_GRID_LINES = 40  # beyond this the grid is drawn as ticks along the axis only, not lines up the plot


def grid_histogram(hist: GridHistogram) -> go.Figure:
    """Histogram of a layer's weights in scale units with the format's grid: every grid
    value as a red tick on the x axis (outside the plot, never over a bar); with few grid
    values also a thin see-through line up the plot, so a bar keeps its colour under it."""
    centers = [(a + b) / 2 for a, b in zip(hist.edges[:-1], hist.edges[1:])]
    width = hist.edges[1] - hist.edges[0]
    fig = go.Figure(go.Bar(x=centers, y=list(hist.counts), width=width, marker_color=BARS, name="weights",
                           hovertemplate=f"{hist.unit} ≈ %{{x:.3g}}<br>%{{y}} weights<extra></extra>"))
    top = max(hist.counts) if hist.counts else 1
    if len(hist.grid) <= _MAX_GRID_LINES:
        xs, ys = [], []
        for g in hist.grid:
            xs += [g, g, None]
            ys += [0, top * 1.05, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=GRID_LINE, width=1),
                                 name=f"{hist.format} grid ({len(hist.grid)} values)", hoverinfo="skip"))
    else:  # only the legend entry: the axis ticks below draw the grid
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers",
                                 marker=dict(symbol="line-ns-open", size=10, color=GRID),
                                 name=f"{hist.format} grid ({len(hist.grid)} values in range)"))
    grid_ticks = dict(tickmode="array", tickvals=list(hist.grid), ticks="outside", ticklen=7, tickwidth=1,
                      tickcolor=GRID, showgrid=False)
    # invisible major ticks as long as the grid's push the value labels below the red ticks
    labels_below = dict(ticks="outside", ticklen=grid_ticks["ticklen"] + 1, tickcolor="rgba(0,0,0,0)")
    fig.update_layout(xaxis=dict(title=hist.unit, minor=grid_ticks, **labels_below), yaxis_title="weights",
                      height=340, bargap=0, margin=dict(t=30, b=40), legend=dict(orientation="h", y=1.1, x=0))
    return fig


def _unit_labels(units) -> list[str]:
    return [f"block {u}" if isinstance(u, int) else str(u) for u in units]


def sensitivity_bars(sens: Sensitivity, allocation: Allocation | None = None) -> go.Figure:
    """Quality drop when only that layer is quantized; with an allocation, bars coloured
    by the format it chose for the layer (grey: kept as it is)."""
    labels = _unit_labels(sens.units)
    chosen = list(allocation.formats) if allocation else [sens.format] * len(labels)
    names = list(dict.fromkeys(chosen))
    fig = go.Figure()
    for i, fmt in enumerate(names):
        index = [k for k, c in enumerate(chosen) if c == fmt]
        fig.add_bar(x=[labels[k] for k in index], y=[sens.drops[k] for k in index],
                    name=f"{fmt or 'kept'}" if allocation else f"only this layer in {sens.format}",
                    marker_color=FORMAT_COLORS[i % len(FORMAT_COLORS)] if fmt else RTN,
                    customdata=[[sens.base_bits[k] / 8 / 1024, sens.quantized_bits[k] / 8 / 1024] for k in index],
                    hovertemplate=(f"%{{x}}<br>{sens.label}: %{{y:.4g}} with only this layer in {sens.format}"
                                   "<br>%{customdata[0]:.1f} KiB → %{customdata[1]:.1f} KiB<extra></extra>"))
    yaxis = value_axis(torch.tensor(sens.drops))
    fig.update_layout(xaxis=dict(title="layer", type="category", categoryorder="array", categoryarray=labels),
                      yaxis=dict(title=sens.label, **yaxis), height=360, barmode="overlay",
                      bargap=_bargap(len(labels)), margin=dict(t=30, b=40), legend=dict(orientation="h", y=1.1, x=0))
    return fig


def outlier_bars(report: OutlierReport) -> go.Figure:
    """LLM.int8: input columns kept in 16-bit per layer (some |x| >= threshold); the hover
    lists them and the layer's largest |x|."""
    layers = list(report.layers)
    hover = [f"{n}<br>{len(c)} of {w} input columns in 16-bit: {', '.join(map(str, c[:12]))}"
             f"{' …' if len(c) > 12 else ''}<br>largest |x| = {p:.3g}"
             for n, c, w, p in zip(layers, report.columns, report.widths, report.peaks)]
    fig = go.Figure(go.Bar(x=layers, y=[len(c) for c in report.columns], marker_color=BARS,
                           hovertext=hover, hoverinfo="text"))
    fig.update_layout(xaxis=dict(title="linear layer", tickangle=-45 if len(layers) > 8 else 0),
                      yaxis=dict(title=f"outlier columns (|x| ≥ {report.threshold:g})", rangemode="tozero"),
                      height=340, bargap=_bargap(len(layers)), margin=dict(t=30, b=40))
    return fig
