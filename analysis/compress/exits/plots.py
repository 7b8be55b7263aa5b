"""Figures of early exits (`rule`, `inputs`, `stats`): the trade-off curve of compute saved against
agreement or quality for every criterion, each token of a prompt coloured by its exit
layer, images titled with their exit stage, and how close each lens comes to the final
layer. Layout only, no streamlit; conventions as in `analysis.plots`."""

from __future__ import annotations

import math
from typing import Mapping

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analysis.compress.exits.inputs import InputExits
from analysis.compress.exits.rule import CRITERION_LABELS, ExitCurve, ExitPoint
from analysis.compress.exits.stats import LensKL
from analysis.lens import LENS_LABELS
from analysis.plots import integer_axis, token_label

CRITERION_COLORS = {"max_prob": "#1f77b4", "entropy": "#ff7f0e", "patience": "#2ca02c", "saturation": "#9467bd"}
QUALITIES = {"agreement": "top-1 agreement with the full model", "perplexity": "perplexity of exited predictions",
             "accuracy": "accuracy of exited predictions", "nll": "loss of exited predictions (nats/token)"}
HIGHER_IS_BETTER = {"agreement", "accuracy"}


def _quality(curve: ExitCurve | ExitPoint, quality: str) -> list[float]:
    value = getattr(curve, quality)
    if value is None:
        raise ValueError(f"These exits have no {quality} (plain text has no answers to be accurate on).")
    return value.tolist() if hasattr(value, "tolist") else [value]


def _saved(curve: ExitCurve | ExitPoint, oracle: bool) -> list[float]:
    value = curve.saved_oracle if oracle else curve.saved
    return [100 * v for v in (value.tolist() if hasattr(value, "tolist") else [value])]


def tradeoff_curves(curves: Mapping[str, ExitCurve], quality: str = "agreement", oracle: bool = False,
                    current: ExitPoint | None = None, keys_values: bool = True) -> go.Figure:
    """Compute saved (%) against `quality` ("agreement", "perplexity", "accuracy", "nll"),
    one line per criterion, every threshold a point (hover: threshold, mean exit layer);
    `current` marked with a star. Left of the dashed line at 0 the checks cost more than
    the skipped layers save. `oracle`: savings that ignore the skipped layers' keys and
    values; `keys_values` False for models that owe none (classifiers)."""
    fig = go.Figure()
    for criterion, curve in curves.items():
        thresholds = curve.thresholds.tolist()
        fig.add_scatter(
            x=_saved(curve, oracle), y=_quality(curve, quality), mode="lines+markers", name=CRITERION_LABELS[criterion],
            line=dict(color=CRITERION_COLORS[criterion], width=2), marker=dict(size=5),
            customdata=list(zip(thresholds, curve.mean_exit.tolist(), (100 * curve.early).tolist())),
            hovertemplate=(f"{CRITERION_LABELS[criterion]}<br>t = %{{customdata[0]:.4g}}<br>compute saved %{{x:.1f}}%"
                           f"<br>{quality} %{{y:.4g}}<br>mean exit layer %{{customdata[1]:.2f}}"
                           "<br>exit early %{customdata[2]:.0f}%<extra></extra>"))
    if current is not None:
        fig.add_scatter(
            x=_saved(current, oracle), y=_quality(current, quality), mode="markers", name="current threshold",
            marker=dict(symbol="star", size=18, color=CRITERION_COLORS[current.criterion],
                        line=dict(width=1, color="black")),
            hovertemplate=(f"current: {CRITERION_LABELS[current.criterion]}, t = {current.threshold:.4g}<br>"
                           f"compute saved %{{x:.1f}}%<br>{quality} %{{y:.4g}}<br>"
                           f"mean exit layer {current.mean_exit:.2f}<extra></extra>"))
    fig.add_vline(x=0, line=dict(color="#888", dash="dash", width=1))
    worse = "lower" if quality in HIGHER_IS_BETTER else "higher"
    if not keys_values:
        saved = "compute saved, % (exit checks charged)"
    elif oracle:
        saved = "compute saved, % (oracle: skipped layers' keys/values free)"
    else:
        saved = "compute saved, % (checks and skipped layers' keys/values charged)"
    fig.update_layout(xaxis_title=saved, yaxis_title=f"{QUALITIES[quality]} ({worse} is worse)", height=440,
                      margin=dict(t=60, b=50), legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return fig


def token_exits(exits: InputExits, per_row: int = 16) -> go.Figure:
    """The input's tokens in reading order, `per_row` to a row, each cell coloured by the
    depth where the prediction after that token exits (the full model's depth: no early
    exit); hover shows the prediction there and whether the full model agrees."""
    n = len(exits.labels)
    rows = max(1, math.ceil(n / per_row))
    z = [[None] * per_row for _ in range(rows)]
    text = [[""] * per_row for _ in range(rows)]
    hover = [[""] * per_row for _ in range(rows)]
    for i, (label, depth) in enumerate(zip(exits.labels, exits.exit_depth)):
        r, c = divmod(i, per_row)
        z[r][c], text[r][c] = depth, token_label(label)
        agree = "same as the full model" if exits.agrees[i] else f"full model: {token_label(exits.full[i])}"
        hover[r][c] = (f"{token_label(label)} → exits {exits.where[i]} (depth {depth})<br>"
                       f"predicts {token_label(exits.predicted[i])} ({agree})")
    low = min(exits.depths) if exits.depths else 0
    fig = go.Figure(go.Heatmap(
        z=z, text=text, texttemplate="%{text}", textfont=dict(size=14), customdata=hover,
        hovertemplate="%{customdata}<extra></extra>", zmin=low, zmax=exits.n_layers, colorscale="Viridis",
        xgap=2, ygap=2, colorbar=dict(title=dict(text="exit<br>layer"), **integer_axis(exits.n_layers + 1))))
    fig.update_layout(height=90 + 42 * rows, margin=dict(t=10, b=10, l=10, r=10),
                      xaxis=dict(visible=False), yaxis=dict(visible=False, autorange="reversed"))
    return fig


def lens_kl_lines(lenses: list[LensKL]) -> go.Figure:
    """Mean KL(final ‖ depth) per depth for each lens: how far each readout is from the
    model's own output, so how much an exit there can agree with it."""
    fig = go.Figure()
    for lens in lenses:
        fig.add_scatter(x=list(lens.depths), y=lens.kl.tolist(), mode="lines+markers", name=LENS_LABELS[lens.lens],
                        hovertemplate=f"{LENS_LABELS[lens.lens]}<br>depth %{{x}}<br>KL %{{y:.4g}} nats<extra></extra>")
    last = max(max(lens.depths) for lens in lenses)
    fig.update_layout(xaxis=dict(title="depth (layers run)", **integer_axis(last + 1)),
                      yaxis=dict(title="KL(final ‖ depth), nats", rangemode="tozero"), height=330,
                      margin=dict(t=30, b=10), legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0),
                      showlegend=True)
    return fig


def image_exits(images: torch.Tensor, exits: InputExits, labels: list[int], per_row: int = 4) -> go.Figure:
    """Images [n, 1, H, W] in [0, 1], `per_row` to a row, each titled with where it exits,
    the class predicted there (✓ when the full model predicts the same, ✗ not) and its label."""
    n = images.shape[0]
    rows = max(1, math.ceil(n / per_row))
    titles = [f"{where}<br>predicts {pred} {'✓' if agree else '✗'} · label {label}"
              for where, pred, agree, label in zip(exits.where, exits.predicted, exits.agrees, labels)]
    fig = make_subplots(rows=rows, cols=per_row, subplot_titles=titles, horizontal_spacing=0.04,
                        vertical_spacing=0.12)
    for i in range(n):
        row, col = divmod(i, per_row)
        axis = "" if i == 0 else str(i + 1)
        fig.add_heatmap(z=images[i].squeeze(0).float().tolist(), colorscale="gray_r", zmin=0, zmax=1, showscale=False,
                        hovertemplate=f"{exits.labels[i]}: " + titles[i].replace("<br>", ", ") + "<extra></extra>",
                        row=row + 1, col=col + 1)
        fig.update_xaxes(visible=False, constrain="domain", row=row + 1, col=col + 1)
        fig.update_yaxes(visible=False, autorange="reversed", scaleanchor=f"x{axis}", constrain="domain",
                         row=row + 1, col=col + 1)
    fig.update_annotations(font_size=12)
    fig.update_layout(height=40 + 190 * rows, margin=dict(t=40, b=5, l=5, r=5))
    return fig
