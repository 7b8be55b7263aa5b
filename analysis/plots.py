"""Plotting helpers every view's figures share (axes, token labels, heat maps) and the Model
page's figures of predictions. No computation beyond layout, no streamlit; each view's own
figures live in its package (`analysis.redundancy.plots`, `analysis.channels.plots`, ...).

Conventions, so that a figure under a page's section header adds to it rather than
repeating it: no figure title where the header and the axis titles already say what
is shown; every colour bar has a title; integer axes (layer, depth, block, n) tick
whole numbers only; a log axis is used only for positive values spanning at least a
decade, and then always carries labelled ticks inside the data's range.
"""

from __future__ import annotations

import html
import math
from collections import Counter

import plotly.graph_objects as go
import torch

from analysis.predict import ImagePrediction, NextTokens

# ------------------------------------------------------------------ axes

_MAX_INTEGER_TICKS = 16


def integer_axis(n: int) -> dict:
    """Axis settings for n integer positions 0..n-1: a tick on every whole number
    (every 2nd, 5th, 10th ... once there are more than 16), never on 0.5."""
    decade = 1
    while True:
        for step in (decade, 2 * decade, 5 * decade):
            if n / step <= _MAX_INTEGER_TICKS:
                return dict(tickmode="linear", tick0=0, dtick=step)
        decade *= 10


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis over [lo, hi] (0 < lo <= hi): 1-2-5 per decade, or
    one per decade when the data span more than 3 decades. Any interval of at least a
    decade then holds at least two of them."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mantissas = (1, 2, 5) if last - first <= 3 else (1,)
    return [m * 10.0**e for e in range(first, last + 1) for m in mantissas]


def value_axis(values: torch.Tensor) -> dict:
    """Axis settings for bars of `values` [n]: linear from 0 unless all are positive and
    span at least a decade; then log, labelled 1-2-5 ("~g": 0.5 reads as 0.5, not 5).

    A log axis over values less than a decade apart zooms in on them, so that bars of
    0.458 and 0.431 look ten times apart, and may show no tick label at all."""
    v = values[torch.isfinite(values)].double()
    if v.numel() == 0 or float(v.min()) <= 1e-12 or float(v.max() / v.min()) < 10:
        return dict(type="linear", rangemode="tozero")
    lo, hi = float(v.min()), float(v.max())
    # bars on a log axis start at its lower edge: half a decade below the smallest value
    # keeps that bar visible instead of a sliver
    return dict(type="log", tickmode="array", tickvals=log_ticks(lo, hi), tickformat="~g",
                range=[math.log10(lo) - 0.5, math.log10(hi) + 0.1])


def _bargap(n_categories: int) -> float:
    """Gap between bar groups: a lone bar would otherwise fill the whole plot width."""
    return 0.2 if n_categories > 3 else 0.6


def _is_log(axis: dict) -> bool:
    return axis["type"] == "log"


# ------------------------------------------------------------------ predictions

_MARK_COLOR = "#d62728"  # whitespace markers stand out from the token text
_WHITESPACE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "\\r"}  # ␍ has no glyph in DejaVu/Liberation
WHITESPACE_NOTE = "␣ space, ↵ newline, ⇥ tab"  # for the caption under the chart


def _mark(text: str) -> str:
    return f"<span style='color:{_MARK_COLOR}'>{text}</span>"


def token_label(token: str) -> str:
    """A token as plotly label text: HTML-escaped (a token "<b>" must not turn bold),
    whitespace drawn as coloured markers, the empty token as ∅."""
    if not token:
        return _mark("∅")
    return "".join(_mark(_WHITESPACE[c]) if c in _WHITESPACE else html.escape(c, quote=False) for c in token)


def next_tokens_bar(result: NextTokens) -> go.Figure:
    """Top-k next tokens, most likely at the top. Each bar sits at its rank, so two
    tokens that display alike (e.g. two partial UTF-8 bytes, both "�") stay two bars;
    their labels then also show the token ids."""
    labels = [token_label(t) for t in result.tokens]
    twice = {label for label, count in Counter(labels).items() if count > 1}
    ticks = [f"{label} <span style='color:#888'>(id {i})</span>" if label in twice else label
             for label, i in zip(labels, result.token_ids)]
    ranks = list(range(len(labels)))
    fig = go.Figure(go.Bar(
        x=result.probs.tolist(), y=ranks, orientation="h",
        customdata=list(zip(labels, result.token_ids)),
        hovertemplate="token %{customdata[0]} (id %{customdata[1]})<br>probability %{x:.3f}<extra></extra>",
    ))
    fig.update_layout(xaxis_title="probability of being the next token", height=360,
                      margin=dict(l=10, r=10, t=10, b=10), xaxis_range=[0, 1],
                      yaxis=dict(tickmode="array", tickvals=ranks, ticktext=ticks, autorange="reversed",
                                 tickfont=dict(size=15)))  # larger, so the ␣ marker reads at a glance
    return fig


def image_heatmap(image: torch.Tensor, title: str) -> go.Figure:
    """An image [1, H, W] or [H, W] in [0, 1] as a grey heat map (row 0 at the top)."""
    img = image.squeeze(0).float()
    fig = go.Figure(go.Heatmap(z=img.tolist(), colorscale="gray_r", zmin=0, zmax=1, showscale=False,
                               hovertemplate="row %{y}, col %{x}: %{z:.2f}<extra></extra>"))
    fig.update_layout(title=title, height=260, width=260, margin=dict(l=10, r=10, t=40, b=10),
                      yaxis=dict(autorange="reversed", scaleanchor="x", showticklabels=False, showgrid=False,
                                 zeroline=False),
                      xaxis=dict(showticklabels=False, showgrid=False, zeroline=False))
    return fig


def class_probs_bar(result: ImagePrediction) -> go.Figure:
    """Probability of each class [classes]; every class is labelled (a category axis)."""
    probs = result.probs.tolist()
    fig = go.Figure(go.Bar(x=[str(i) for i in range(len(probs))], y=probs,
                           hovertemplate="class %{x}: %{y:.3f}<extra></extra>"))
    fig.update_layout(yaxis_range=[0, 1], height=260, xaxis_title="class", yaxis_title="probability",
                      xaxis_type="category", margin=dict(l=10, r=10, t=40, b=10))
    return fig


# ------------------------------------------------------------------ matrices


def matrix_heatmap(matrix: torch.Tensor, labels: list[str], title: str = "", zmax: float | None = None,
                   x_title: str = "", y_title: str = "", colorscale: str = "Viridis",
                   value_title: str = "value") -> go.Figure:
    """A square matrix [n, n] with the same labels on both axes (categories, so "0", "1"
    are never read as numbers with ticks at 0.5); `value_title` names the colour bar."""
    fig = go.Figure(go.Heatmap(
        z=matrix.tolist(), x=labels, y=labels, zmin=0, zmax=zmax, colorscale=colorscale,
        colorbar=dict(title=dict(text=value_title)),
        hovertemplate=f"{y_title} %{{y}} · {x_title} %{{x}}<br>{value_title} %{{z:.4f}}<extra></extra>"))
    fig.update_layout(title=title or None, height=420, xaxis_title=x_title, yaxis_title=y_title,
                      xaxis_type="category", yaxis_type="category", yaxis_autorange="reversed",
                      margin=dict(t=40 if title else 10, b=10))
    return fig
