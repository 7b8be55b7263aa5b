"""Plotly figures built from analysis results. No computation beyond layout, no streamlit.

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

from analysis.metric_text import PERCENT_METRICS
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


# ------------------------------------------------------------------ redundancy

_KIND_COLORS = {"block": "#636efa", "attention": "#ef553b", "mlp": "#00cc96", "stage": "#ab63fa"}


def importance_bars(sim) -> go.Figure:
    """Grouped bars of 1 - cos per layer for block, attention and MLP (a LayerSimilarity)."""
    fig = go.Figure()
    layers = list(range(sim.n_layers))
    importance = sim.importance()
    for kind, values in importance.items():
        fig.add_bar(x=layers, y=values.tolist(), name=kind, marker_color=_KIND_COLORS[kind],
                    hovertemplate=f"layer %{{x}}<br>{kind}<br>1 − cos = %{{y:.4f}}<extra></extra>")
    yaxis = value_axis(torch.cat(list(importance.values())))
    fig.update_layout(barmode="group", height=360, xaxis=dict(title="layer", **integer_axis(sim.n_layers)),
                      yaxis=dict(title="1 − cos(input, output)" + (", log axis" if _is_log(yaxis) else ""),
                                 **yaxis),
                      margin=dict(t=10, b=10))
    return fig


def _module_axis_title(sweep) -> str:
    """"stage" when every module of the sweep is an image-model stage, else "layer"."""
    kinds = {m.kind for m in [*sweep.dropped, *sweep.not_droppable]}
    return "stage" if kinds == {"stage"} else "layer"


def drop_cost_bars(sweep, metric: str, label: str) -> go.Figure:
    """Measured change of `metric` with each module dropped alone (a DropSweep); x is the
    layer (language models) or the stage name (image models). Shares (accuracy) change in
    percentage points, as the Model page and the lab show them; other changes hover with
    four significant figures in plain digits ("r": d3's format that never goes scientific)."""
    fig = go.Figure()
    axis = _module_axis_title(sweep)
    points = metric in PERCENT_METRICS
    scale, unit, shown = (100.0, " (percentage points)", "%{y:+.1f} points") if points else (1.0, "", "%{y:+,.4~r}")
    kinds = sorted({m.kind for m in sweep.dropped}, key=list(_KIND_COLORS).index)
    for kind in kinds:
        mods = [m for m in sweep.dropped if m.kind == kind]
        kl = [sweep.dropped[m].kl_to_base for m in mods]
        extra = "<br>KL to base = %{customdata:.4g}" if all(k is not None for k in kl) else ""
        fig.add_bar(x=[str(m.layer) for m in mods], y=[scale * sweep.delta(m, metric) for m in mods],
                    name=kind, marker_color=_KIND_COLORS[kind], customdata=kl,
                    hovertemplate=f"{kind} %{{x}}<br>Δ {label} = {shown}{extra}<extra></extra>")
    n_parts = len({m.layer for m in sweep.dropped})
    fig.update_layout(barmode="group", height=360, xaxis_title=axis, xaxis_type="category", bargap=_bargap(n_parts),
                      yaxis_title=f"Δ {label}{unit}, dropped − base",
                      margin=dict(t=10, b=10))
    return fig


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


def cka_heatmap(cka: torch.Tensor, labels: list[str], axis_title: str) -> go.Figure:
    """Linear CKA [n, n] between depths (LMs) or stages (image models), labelled `labels`."""
    return matrix_heatmap(cka, labels, zmax=1.0, x_title=axis_title, y_title=axis_title, value_title="linear CKA")


def angular_heatmap(angular: torch.Tensor) -> go.Figure:
    """Angular distance d(l, l+n) [depths, depths] as an (l, n) map; cells past the last depth are blank."""
    depths = angular.shape[0]
    z = [[float(angular[l, l + n]) if l + n < depths else None for n in range(1, depths)]
         for l in range(depths - 1)]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(1, depths)), y=list(range(depths - 1)), zmin=0, colorscale="Viridis",
        colorbar=dict(title=dict(text="angular<br>distance")),
        hovertemplate="from depth %{y} skipping n = %{x}<br>angular distance %{z:.4f}<extra></extra>"))
    fig.update_layout(height=420, xaxis=dict(title="n (blocks skipped)", **integer_axis(depths)),
                      yaxis=dict(title="l (start depth)", autorange="reversed", **integer_axis(depths)),
                      margin=dict(t=10, b=10))
    return fig


def lens_lines(lens) -> go.Figure:
    """KL to the final layer, top-1 agreement and entropy per depth (a LogitLens, [depths] each)."""
    from plotly.subplots import make_subplots

    depths = list(range(len(lens.kl)))
    fig = make_subplots(rows=1, cols=3, subplot_titles=("KL(final ‖ depth l), nats",
                                                        "top-1 agreement with final", "entropy, nats"))
    for col, (values, name) in enumerate([(lens.kl, "KL"), (lens.agreement, "agreement"),
                                          (lens.entropy, "entropy")], start=1):
        fig.add_scatter(x=depths, y=values.tolist(), mode="lines+markers", name=name, row=1, col=col,
                        hovertemplate=f"depth %{{x}}<br>{name} %{{y:.4g}}<extra></extra>")
        fig.update_xaxes(title_text="depth", row=1, col=col, **integer_axis(len(depths)))
    fig.update_layout(height=330, showlegend=False, margin=dict(t=40, b=10))
    return fig


def depth_lines(sim) -> go.Figure:
    """Mean residual norm per depth [L+1] and relative update per block [L] (a LayerSimilarity)."""
    from plotly.subplots import make_subplots

    yaxis = value_axis(sim.relative_update)
    update_title = "relative update ‖y−x‖/‖x‖" + (", log axis" if _is_log(yaxis) else "")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("residual norm ‖h_l‖", update_title))
    fig.add_scatter(x=list(range(len(sim.norms))), y=sim.norms.tolist(), mode="lines+markers", row=1, col=1,
                    hovertemplate="depth %{x}<br>norm %{y:.4g}<extra></extra>")
    fig.add_bar(x=list(range(len(sim.relative_update))), y=sim.relative_update.tolist(), row=1, col=2,
                hovertemplate="block %{x}<br>relative update %{y:.4g}<extra></extra>")
    fig.update_yaxes(row=1, col=2, **yaxis)
    fig.update_xaxes(title_text="depth", row=1, col=1, **integer_axis(len(sim.norms)))
    fig.update_xaxes(title_text="block", row=1, col=2, **integer_axis(len(sim.relative_update)))
    fig.update_layout(height=330, showlegend=False, margin=dict(t=40, b=10))
    return fig


def stage_importance_bars(stages) -> go.Figure:
    """Image models: 1 - cos(input, output) for the stages whose shapes match (a StageSimilarity)."""
    names = list(stages.similarity)
    fig = go.Figure(go.Bar(x=names, y=[1 - stages.similarity[n] for n in names],
                           marker_color=_KIND_COLORS["stage"],
                           hovertemplate="stage %{x}<br>1 − cos = %{y:.4f}<extra></extra>"))
    fig.update_layout(height=330, xaxis_title="stage", xaxis_type="category", bargap=_bargap(len(names)),
                      yaxis_title="1 − cos(stage input, output)", margin=dict(t=10, b=10))
    return fig
