"""Plotly figures built from analysis results. No computation beyond layout, no streamlit."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from analysis.predict import ImagePrediction, NextTokens


def _show(token: str) -> str:
    """Make whitespace visible in a token label."""
    return repr(token)[1:-1] if token.strip() != token or not token else token


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
