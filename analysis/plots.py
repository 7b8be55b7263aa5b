"""Plotly figures built from analysis results. No computation beyond layout, no streamlit."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from analysis.predict import ImagePrediction, NextTokens

_VISIBLE = str.maketrans({" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"})


def _show(token: str) -> str:
    """Make whitespace visible in a token label (· space, ↵ newline, ⇥ tab; · renders in every font, ␣ does not)."""
    return token.translate(_VISIBLE) if token else "∅"


def next_tokens_bar(result: NextTokens) -> go.Figure:
    labels = [_show(t) for t in result.tokens]
    fig = go.Figure(go.Bar(
        x=result.probs.tolist()[::-1], y=labels[::-1], orientation="h",
        hovertemplate="token %{y}<br>probability %{x:.3f}<extra></extra>",
    ))
    fig.update_layout(title="Top next tokens", xaxis_title="probability", height=360,
                      margin=dict(l=10, r=10, t=40, b=10), xaxis_range=[0, 1])
    return fig


def image_heatmap(image: torch.Tensor, title: str) -> go.Figure:
    """An image [1, H, W] or [H, W] in [0, 1] as a grey heat map (row 0 at the top)."""
    img = image.squeeze(0).float()
    fig = go.Figure(go.Heatmap(z=img.tolist(), colorscale="gray_r", zmin=0, zmax=1, showscale=False,
                               hovertemplate="row %{y}, col %{x}: %{z:.2f}<extra></extra>"))
    fig.update_layout(title=title, height=260, width=260, margin=dict(l=10, r=10, t=40, b=10),
                      yaxis=dict(autorange="reversed", scaleanchor="x", showticklabels=False),
                      xaxis=dict(showticklabels=False))
    return fig


def class_probs_bar(result: ImagePrediction) -> go.Figure:
    probs = result.probs.tolist()
    fig = go.Figure(go.Bar(x=[str(i) for i in range(len(probs))], y=probs,
                           hovertemplate="class %{x}: %{y:.3f}<extra></extra>"))
    fig.update_layout(title="Class probabilities", yaxis_range=[0, 1], height=260,
                      xaxis_title="class", margin=dict(l=10, r=10, t=40, b=10))
    return fig


# ------------------------------------------------------------------ redundancy

_KIND_COLORS = {"block": "#636efa", "attention": "#ef553b", "mlp": "#00cc96", "stage": "#ab63fa"}


def importance_bars(sim) -> go.Figure:
    """Grouped bars of 1 - cos per layer for block, attention and MLP (a LayerSimilarity)."""
    fig = go.Figure()
    layers = list(range(sim.n_layers))
    for kind, values in sim.importance().items():
        fig.add_bar(x=layers, y=values.tolist(), name=kind, marker_color=_KIND_COLORS[kind],
                    hovertemplate=f"layer %{{x}}<br>{kind}<br>1 − cos = %{{y:.4f}}<extra></extra>")
    values = torch.cat(list(sim.importance().values()))
    # a log axis when the values span decades; not when some are (exactly) zero, which it would hide
    log = bool((values > 1e-9).all() and values.max() / values.min() > 20)
    fig.update_layout(title="Importance = 1 − cos(input, output)" + ("  (log scale)" if log else ""),
                      barmode="group", height=360, xaxis_title="layer", yaxis_title="1 − cosine",
                      yaxis_type="log" if log else "linear", margin=dict(t=40, b=10))
    return fig


def drop_cost_bars(sweep, metric: str, label: str) -> go.Figure:
    """Measured change of `metric` with each module dropped alone (a DropSweep)."""
    fig = go.Figure()
    kinds = sorted({m.kind for m in sweep.dropped}, key=list(_KIND_COLORS).index)
    for kind in kinds:
        mods = [m for m in sweep.dropped if m.kind == kind]
        fig.add_bar(x=[str(m.layer) for m in mods], y=[sweep.delta(m, metric) for m in mods],
                    name=kind, marker_color=_KIND_COLORS[kind],
                    customdata=[sweep.dropped[m].kl_to_base for m in mods],
                    hovertemplate=f"{kind} %{{x}}<br>Δ {label} = %{{y:+.4g}}<br>"
                                  "KL to base = %{customdata:.4g}<extra></extra>")
    fig.update_layout(title=f"Measured: change of {label} when one module is dropped", barmode="group",
                      height=360, xaxis_title="layer / stage", yaxis_title=f"Δ {label}",
                      margin=dict(t=40, b=10))
    return fig


def matrix_heatmap(matrix: torch.Tensor, labels: list[str], title: str, zmax: float | None = None,
                   x_title: str = "", y_title: str = "", colorscale: str = "Viridis") -> go.Figure:
    fig = go.Figure(go.Heatmap(
        z=matrix.tolist(), x=labels, y=labels, zmin=0, zmax=zmax, colorscale=colorscale,
        hovertemplate=f"{y_title} %{{y}} · {x_title} %{{x}}<br>value %{{z:.4f}}<extra></extra>"))
    fig.update_layout(title=title, height=420, xaxis_title=x_title, yaxis_title=y_title,
                      yaxis_autorange="reversed", margin=dict(t=40, b=10))
    return fig


def angular_heatmap(angular: torch.Tensor) -> go.Figure:
    """Angular distance d(l, l+n) as an (l, n) map; cells past the last depth are blank."""
    depths = angular.shape[0]
    z = [[float(angular[l, l + n]) if l + n < depths else None for n in range(1, depths)]
         for l in range(depths - 1)]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(1, depths)), y=list(range(depths - 1)), zmin=0, colorscale="Viridis",
        hovertemplate="from depth %{y} skipping n = %{x}<br>angular distance %{z:.4f}<extra></extra>"))
    fig.update_layout(title="Angular distance between depth l and l + n (last token)", height=420,
                      xaxis_title="n (layers skipped)", yaxis_title="l (start depth)",
                      yaxis_autorange="reversed", margin=dict(t=40, b=10))
    return fig


def lens_lines(lens) -> go.Figure:
    from plotly.subplots import make_subplots

    depths = list(range(len(lens.kl)))
    fig = make_subplots(rows=1, cols=3, subplot_titles=("KL(final ‖ depth l), nats",
                                                        "top-1 agreement with final", "entropy, nats"))
    for col, (values, name) in enumerate([(lens.kl, "KL"), (lens.agreement, "agreement"),
                                          (lens.entropy, "entropy")], start=1):
        fig.add_scatter(x=depths, y=values.tolist(), mode="lines+markers", name=name, row=1, col=col,
                        hovertemplate=f"depth %{{x}}<br>{name} %{{y:.4g}}<extra></extra>")
        fig.update_xaxes(title_text="depth", row=1, col=col)
    fig.update_layout(title="Logit lens", height=330, showlegend=False, margin=dict(t=60, b=10))
    return fig


def depth_lines(sim) -> go.Figure:
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("residual norm ‖h_l‖", "relative update ‖y−x‖/‖x‖ (log)"))
    fig.add_scatter(x=list(range(len(sim.norms))), y=sim.norms.tolist(), mode="lines+markers", row=1, col=1,
                    hovertemplate="depth %{x}<br>norm %{y:.4g}<extra></extra>")
    fig.add_bar(x=list(range(len(sim.relative_update))), y=sim.relative_update.tolist(), row=1, col=2,
                hovertemplate="block %{x}<br>relative update %{y:.4g}<extra></extra>")
    ticks = [m * 10.0**e for e in range(-4, 5) for m in (1, 2, 5)]  # 1-2-5 per decade, full labels
    fig.update_yaxes(type="log", tickvals=ticks, tickformat="~g", row=1, col=2)
    fig.update_xaxes(title_text="depth", row=1, col=1)
    fig.update_xaxes(title_text="block", row=1, col=2)
    fig.update_layout(title="Depth effect", height=330, showlegend=False, margin=dict(t=60, b=10))
    return fig


def stage_importance_bars(stages) -> go.Figure:
    """Image models: 1 - cos(input, output) for the stages whose shapes match (a StageSimilarity)."""
    names = list(stages.similarity)
    fig = go.Figure(go.Bar(x=names, y=[1 - stages.similarity[n] for n in names],
                           marker_color=_KIND_COLORS["stage"],
                           hovertemplate="stage %{x}<br>1 − cos = %{y:.4f}<extra></extra>"))
    fig.update_layout(title="Importance = 1 − cos(stage input, stage output)", height=330,
                      xaxis_title="stage", yaxis_title="1 − cosine", margin=dict(t=40, b=10))
    return fig
