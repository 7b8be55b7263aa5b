"""Figures of the Representations view: probe accuracy per property and depth beside its
references, and weights across depth. Layout only, no streamlit; conventions as in
`analysis.plots`."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.plots import _bargap, integer_axis
from analysis.representations.depth import DepthFit
from analysis.representations.probes import ProbeResult

_PROBE, _CONTROL, _MAJORITY, _ALONE = "#636efa", "#ef553b", "#7f7f7f", "#00cc96"
_FAMILY_COLORS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880")


def probe_lines(result: ProbeResult, columns: int = 3) -> go.Figure:
    """One panel per property: probe and control-task accuracy per depth (lines), majority
    class and the lookup baseline (token alone, nearest prototype; flat lines), all on test
    tokens or images, y from 0 to 100%. Image models' depths are named by stage."""
    n = len(result.properties)
    columns = min(columns, n)
    rows = -(-n // columns)
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=list(result.names),
                        shared_yaxes=True, vertical_spacing=0.16, horizontal_spacing=0.04)
    numeric = all(label.isdigit() for label in result.depth_labels)
    depths = list(range(len(result.depth_labels))) if numeric else list(result.depth_labels)
    where = "depth %{x}" if numeric else "%{x}"
    for i, name in enumerate(result.names):
        row, col = divmod(i, columns)
        first = i == 0  # one legend entry per line kind
        for values, label, color, dash in ((result.accuracy[i], "probe", _PROBE, "solid"),
                                           (result.control[i], "control task", _CONTROL, "dot"),
                                           ([float(result.token_alone[i])] * len(depths), result.baseline_name,
                                            _ALONE, "dashdot"),
                                           ([float(result.majority[i])] * len(depths), "majority class", _MAJORITY,
                                            "dash")):
            values = [float(v) for v in values]
            fig.add_scatter(x=depths, y=values, mode="lines+markers" if dash in ("solid", "dot") else "lines",
                            name=label, legendgroup=label, showlegend=first, line=dict(color=color, dash=dash),
                            row=row + 1, col=col + 1,
                            hovertemplate=f"{name}<br>{where}<br>{label} %{{y:.1%}}<extra></extra>")
        axis = integer_axis(len(depths)) if numeric else dict(type="category", tickangle=-45)
        fig.update_xaxes(row=row + 1, col=col + 1, title_text="depth" if numeric else "stage output", **axis)
        fig.update_yaxes(row=row + 1, col=col + 1, range=[0, 1.02], tickformat=".0%")
    for r in range(rows):
        fig.update_yaxes(row=r + 1, col=1, title_text="test accuracy")
    one_row = rows == 1  # a short figure: the legend needs more room above the panel titles
    fig.update_layout(height=300 * rows + (90 if one_row else 60), margin=dict(t=80 if one_row else 40, b=10),
                      legend=dict(orientation="h", yanchor="bottom", y=1.12 if one_row else 1.04, x=0))
    return fig


def residual_lines(fit: DepthFit) -> go.Figure:
    """Relative residual of each layer under θ_A + (l/L)·θ_B, one line per family, and the
    chance level of layers that share nothing (dashed)."""
    fig = go.Figure()
    layers = list(fit.layers)
    for f, label in enumerate(fit.labels):
        fig.add_scatter(x=layers, y=fit.residual[f].tolist(), mode="lines+markers", name=label,
                        line=dict(color=_FAMILY_COLORS[f % len(_FAMILY_COLORS)]),
                        hovertemplate=f"{label}<br>block %{{x}}<br>residual %{{y:.1%}}<extra></extra>")
    fig.add_scatter(x=layers, y=fit.chance.tolist(), mode="lines", name="unrelated layers (chance)",
                    line=dict(color=_MAJORITY, dash="dash"),
                    hovertemplate="block %{x}<br>chance %{y:.1%}<extra></extra>")
    fig.update_layout(height=380, margin=dict(t=10, b=10), legend=dict(orientation="h", yanchor="top", y=-0.2, x=0),
                      xaxis=dict(title="block", **integer_axis(fit.n_layers)),
                      yaxis=dict(title="‖W_l − θ_A − (l/L)·θ_B‖ / ‖W_l‖", tickformat=".0%", rangemode="tozero"))
    return fig


def _pair_labels(fit: DepthFit) -> list[str]:
    return [f"{a}→{b}" for a, b in fit.pairs]


def cosine_lines(fit: DepthFit) -> go.Figure:
    """Cosine between consecutive layers' weights, one line per family."""
    fig = go.Figure()
    pairs = _pair_labels(fit)
    for f, label in enumerate(fit.labels):
        fig.add_scatter(x=pairs, y=fit.cosine[f].tolist(), mode="lines+markers", name=label,
                        line=dict(color=_FAMILY_COLORS[f % len(_FAMILY_COLORS)]),
                        hovertemplate=f"{label}<br>blocks %{{x}}<br>cosine %{{y:.4f}}<extra></extra>")
    fig.update_layout(height=380, margin=dict(t=10, b=10), legend=dict(orientation="h", yanchor="top", y=-0.2, x=0),
                      xaxis=dict(title="blocks", type="category"),
                      yaxis=dict(title="cos(W_l, W_l+1)"))
    return fig


def share_bars(fit: DepthFit) -> go.Figure:
    """What sharing would change per pair: each family's relative weight change (bars) and
    the pair's over all its families (black markers)."""
    fig = go.Figure()
    pairs = _pair_labels(fit)
    for f, label in enumerate(fit.labels):
        fig.add_bar(x=pairs, y=fit.share_loss[f].tolist(), name=label,
                    marker_color=_FAMILY_COLORS[f % len(_FAMILY_COLORS)],
                    hovertemplate=f"{label}<br>blocks %{{x}}<br>change %{{y:.1%}}<extra></extra>")
    fig.add_scatter(x=pairs, y=fit.share_total.tolist(), mode="markers", name="all families",
                    marker=dict(color="black", symbol="diamond", size=10),
                    hovertemplate="blocks %{x}<br>all families %{y:.1%}<extra></extra>")
    fig.update_layout(height=340, margin=dict(t=10, b=10), barmode="group", bargap=_bargap(len(pairs)),
                      xaxis=dict(title="source → target block", type="category"),
                      yaxis=dict(title="‖W_target − shared‖ / ‖W_target‖", tickformat=".0%", rangemode="tozero"))
    return fig
