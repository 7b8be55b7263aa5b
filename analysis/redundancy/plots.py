"""Figures of the Redundancy view (`similarity`, `drops`, the logit lens): how much each
layer changes the residual stream, what dropping it costs, how alike depths are, what each
depth predicts. Layout only, no streamlit; conventions as in `analysis.plots`."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from analysis.metric_text import PERCENT_METRICS
from analysis.plots import _bargap, _is_log, integer_axis, matrix_heatmap, value_axis

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
