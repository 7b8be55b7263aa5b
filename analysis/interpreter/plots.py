"""Figures of the Interpreter view, built from `relu`, `transformer` and `attributions` results. No
computation beyond layout, no streamlit (conventions: `analysis.plots`).

Signed maps (votes, rows and columns of A, attributions) use one diverging scale centred
on 0 and shared by every panel of a figure, so equal colours mean equal values.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analysis.interpreter.attributions import AttributionComparison
from analysis.interpreter.relu import LinearMap
from analysis.interpreter.transformer import TokenContributions, shown_token
from analysis.plots import token_label

SIGNED = "RdBu_r"  # red = pushes the output up, blue = pushes it down
_TILE_GAP = 0.04
TOKENS_PER_ROW = 16


def _symmetric(values: list[torch.Tensor]) -> float:
    """The largest |value| over all panels (at least a tiny positive number)."""
    return max([float(v.abs().max()) for v in values] + [1e-12])


def image_gallery(images: list[torch.Tensor], titles: list[str], cols: int, value_title: str,
                  signed: bool = True, height_per_row: int | None = None) -> go.Figure:
    """Images [H, W] (or [1, H, W]) side by side, `cols` per row, on one colour scale:
    diverging around 0 when `signed`, else grey from 0 to 1. Rows are about as tall as a
    panel is wide on a page ~1100 px wide, so square panels leave no blank band."""
    rows = math.ceil(len(images) / cols)
    two_lines = any("<br>" in t for t in titles)
    height_per_row = height_per_row or int(min(280, max(120, 760 / cols + (60 if two_lines else 40))))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=_TILE_GAP,
                        vertical_spacing=0.12 / max(rows, 1) + 0.04)
    zmax = _symmetric(images) if signed else 1.0
    for i, image in enumerate(images):
        z = image.squeeze(0).float()
        fig.add_trace(go.Heatmap(z=z.tolist(), coloraxis="coloraxis",
                                 hovertemplate="row %{y}, col %{x}: %{z:.4g}<extra></extra>"),
                      row=i // cols + 1, col=i % cols + 1)
    axis = dict(colorscale=SIGNED, cmin=-zmax, cmax=zmax) if signed else dict(colorscale="gray_r", cmin=0, cmax=1)
    fig.update_layout(coloraxis=dict(**axis, colorbar=dict(title=dict(text=value_title))),
                      height=height_per_row * rows + 40, margin=dict(l=10, r=10, t=60 if two_lines else 30, b=10))
    fig.update_xaxes(showticklabels=False, constrain="domain")
    fig.update_yaxes(showticklabels=False, autorange="reversed", scaleanchor="x", constrain="domain")
    for k in range(2, len(images) + 1):  # every panel square, not only the first
        fig.update_yaxes(scaleanchor=f"x{k}", row=(k - 1) // cols + 1, col=(k - 1) % cols + 1)
    return fig


def class_maps(linear: LinearMap, labels: list[str], what: str) -> go.Figure:
    """Every output's vote map x0 ⊙ row_k (`what` "votes") or row of A ("rows"), 5 per row."""
    maps = [linear.votes(k) if what == "votes" else linear.row(k) for k in range(linear.n_outputs)]
    title = "vote x0·A" if what == "votes" else "weight A"
    return image_gallery(maps, labels, cols=5, value_title=title)


def mosaic(linear: LinearMap, what: str) -> go.Figure:
    """All columns (`what` "columns": what a unit impulse at input pixel (r, c) adds to
    the output image) or all rows ("rows": output pixel (r, c)'s weights on the input) of
    A as one grid of small images, tile (r, c) at row r, column c."""
    h, w = linear.x0.shape[-2:]
    tiles = [linear.column(j) if what == "columns" else linear.row(j) for j in range(linear.matrix.shape[1])]
    th, tw = tiles[0].shape[-2:]
    z: list[list[float | None]] = []
    for r in range(h):
        for i in range(th):
            line: list[float | None] = []
            for c in range(w):
                line += tiles[r * w + c].reshape(th, tw)[i].tolist() + [None]
            z.append(line)
        z.append([None] * len(z[-1]))
    zmax = _symmetric(tiles)
    fig = go.Figure(go.Heatmap(z=z, colorscale=SIGNED, zmin=-zmax, zmax=zmax, hoverongaps=False,
                               colorbar=dict(title=dict(text="A entry")),
                               hovertemplate="%{z:.4g}<extra></extra>"))
    fig.update_layout(height=560, width=600, margin=dict(l=10, r=10, t=10, b=10),
                      xaxis=dict(showticklabels=False, constrain="domain"),
                      yaxis=dict(showticklabels=False, autorange="reversed", scaleanchor="x", constrain="domain"))
    return fig


def input_and_bias_bars(linear: LinearMap, labels: list[str]) -> go.Figure:
    """Per output: A x0 (from the input) and b (the bias) stacked, F(x0) as a marker."""
    part, bias = linear.input_part.tolist(), linear.bias.tolist()
    share = linear.bias_share.tolist()
    fig = go.Figure()
    fig.add_bar(x=labels, y=part, name="from the input A·x0", marker_color="#636efa",
                hovertemplate="%{x}<br>A·x0 = %{y:.4g}<extra></extra>")
    fig.add_bar(x=labels, y=bias, name="bias b", marker_color="#ab63fa", customdata=share,
                hovertemplate="%{x}<br>b = %{y:.4g}<br>bias share b/F = %{customdata:.1%}<extra></extra>")
    fig.add_scatter(x=labels, y=linear.output.tolist(), mode="markers", name="output F(x0)",
                    marker=dict(color="black", symbol="diamond", size=9),
                    hovertemplate="%{x}<br>F(x0) = %{y:.4g}<extra></extra>")
    fig.update_layout(barmode="relative", height=340, xaxis_type="category", yaxis_title="logit",
                      margin=dict(t=10, b=10), legend=dict(orientation="h", y=1.12))
    return fig


def output_parts(linear: LinearMap) -> go.Figure:
    """Image outputs: A x0, b and F(x0) as three images on one diverging scale."""
    part = (linear.matrix @ linear.x0.flatten()).view(linear.output_shape)
    return image_gallery([part, linear.bias.view(linear.output_shape), linear.output.view(linear.output_shape)],
                         ["from the input A·x0", "bias b", "output F(x0) = A·x0 + b"], cols=3, value_title="value")


def svd_gallery(linear: LinearMap) -> go.Figure:
    """The top input patterns (right singular vectors v_i of A) with their singular values."""
    titles = [f"σ{i + 1} = {float(s):.3g}" for i, s in enumerate(linear.singular_values)]
    return image_gallery(list(linear.input_vectors), titles, cols=min(8, len(titles)), value_title="v_i")


def attribution_maps(comparison: AttributionComparison) -> go.Figure:
    """Image models: the exact vote map and each captum method's map, each scaled to its
    own largest |value| (Saliency is a gradient, not a share of the output), r to the
    exact map in each title."""
    images = [comparison.exact] + [m.values for m in comparison.methods]
    images = [v / max(float(v.abs().max()), 1e-12) for v in images]
    titles = ["exact x0 ⊙ A<br>"] + [f"{m.method}<br>r = {m.correlation:.2f}" for m in comparison.methods]
    return image_gallery(images, titles, cols=len(images), value_title="÷ map max")


def _strip_rows(n: int) -> int:
    return math.ceil(n / TOKENS_PER_ROW)


def token_strip(result: TokenContributions) -> go.Figure:
    """The prompt's tokens coloured by their exact contribution (red up, blue down),
    `TOKENS_PER_ROW` per row, each cell labelled with its token."""
    values = result.contributions.tolist()
    n, rows = len(values), _strip_rows(len(values))
    z = [[values[r * TOKENS_PER_ROW + c] if r * TOKENS_PER_ROW + c < n else None for c in range(TOKENS_PER_ROW)]
         for r in range(rows)]
    # plain text: the coloured whitespace markers of analysis.plots would vanish on a dark cell
    text = [[shown_token(result.texts[r * TOKENS_PER_ROW + c], limit=6) if r * TOKENS_PER_ROW + c < n else ""
             for c in range(TOKENS_PER_ROW)] for r in range(rows)]
    full = [[shown_token(result.texts[r * TOKENS_PER_ROW + c]) if r * TOKENS_PER_ROW + c < n else ""
             for c in range(TOKENS_PER_ROW)] for r in range(rows)]
    hover = [[[r * TOKENS_PER_ROW + c, full[r][c]] for c in range(TOKENS_PER_ROW)] for r in range(rows)]
    zmax = _symmetric([result.contributions])
    fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", textfont=dict(size=15), customdata=hover,
                               colorscale=SIGNED, zmin=-zmax, zmax=zmax, hoverongaps=False, xgap=2, ygap=2,
                               colorbar=dict(title=dict(text="contribution", side="right"), nticks=5,
                                             thickness=14),
                               hovertemplate="position %{customdata[0]}: %{customdata[1]}<br>contribution "
                                             "%{z:+.4g}<extra></extra>"))
    fig.update_layout(height=max(60 * rows + 40, 160), margin=dict(l=10, r=10, t=10, b=10),  # room for the colour bar
                      xaxis=dict(showticklabels=False), yaxis=dict(showticklabels=False, autorange="reversed"))
    return fig


def token_parts_bars(result: TokenContributions) -> go.Figure:
    """Per position: the token embedding's and the position embedding's contribution, stacked."""
    positions = list(range(len(result.texts)))
    labels = [token_label(t) for t in result.texts]
    fig = go.Figure()
    fig.add_bar(x=positions, y=result.token_part.tolist(), name="token embedding", marker_color="#636efa",
                customdata=labels, hovertemplate="%{x}: %{customdata}<br>token %{y:+.4g}<extra></extra>")
    if result.has_positions:
        fig.add_bar(x=positions, y=result.position_part.tolist(), name="position embedding",
                    marker_color="#00cc96", customdata=labels,
                    hovertemplate="%{x}: %{customdata}<br>position %{y:+.4g}<extra></extra>")
    fig.update_layout(barmode="relative", height=300, xaxis_title="position", yaxis_title="contribution",
                      margin=dict(t=10, b=10), legend=dict(orientation="h", y=1.15))
    return fig


def token_attribution_strips(comparison: AttributionComparison, texts: tuple[str, ...]) -> go.Figure:
    """Language models: one row per method (exact first) over the prompt's positions, each
    row scaled to its own largest |value| (the methods' units differ), r in the row label."""
    rows = [("exact", comparison.exact)] + [(f"{m.method} (r = {m.correlation:.2f})", m.values)
                                            for m in comparison.methods]
    z = [(v / max(float(v.abs().max()), 1e-12)).tolist() for _, v in rows]
    raw = [v.tolist() for _, v in rows]
    fig = go.Figure(go.Heatmap(z=z, y=[name for name, _ in rows], x=list(range(len(texts))), customdata=raw,
                               colorscale=SIGNED, zmin=-1, zmax=1, xgap=1, ygap=2,
                               colorbar=dict(title=dict(text="÷ row max")),
                               hovertemplate="position %{x}<br>%{y}<br>value %{customdata:+.4g}<extra></extra>"))
    fig.update_layout(height=70 * len(rows) + 60, margin=dict(t=10, b=10),
                      xaxis=dict(tickmode="array", tickvals=list(range(len(texts))),
                                 ticktext=[token_label(shown_token(t, limit=6) if len(t) > 6 else t) for t in texts],
                                 tickangle=0),
                      yaxis=dict(autorange="reversed"))
    return fig
