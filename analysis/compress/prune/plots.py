"""Figures for allocating pruning: distortion curves, the chosen per-layer sparsities,
singular value spectra with the cut, and the evolutionary search's progress."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from analysis.compress.prune.allocation import Allocation, DistortionCurves


def distortion_curves(curves: DistortionCurves, chosen: Allocation | None = None) -> go.Figure:
    """One line per layer: distortion vs sparsity (log y), the chosen level marked."""
    fig = go.Figure()
    x = (curves.levels * 100).tolist()
    for i, name in enumerate(curves.layers):
        y = curves.distortion[i].clamp_min(1e-12).tolist()
        fig.add_scatter(x=x, y=y, mode="lines", name=name, line=dict(width=1),
                        hovertemplate=f"{name}<br>sparsity %{{x:.0f}}%<br>distortion %{{y:.3g}}<extra></extra>")
    if chosen is not None:
        k = [int((curves.levels - float(s)).abs().argmin()) for s in chosen.sparsities]
        fig.add_scatter(x=[x[j] for j in k], y=[float(curves.distortion[i, j].clamp_min(1e-12))
                                                for i, j in enumerate(k)],
                        mode="markers", marker=dict(size=9, color="black", symbol="x"), name="chosen",
                        hovertemplate="chosen level %{x:.0f}%<extra></extra>")
    fig.update_layout(height=380, xaxis_title="sparsity of this layer alone (%)",
                      yaxis_title="mean squared change of the outputs", yaxis_type="log",
                      margin=dict(t=20, b=10), showlegend=len(curves.layers) <= 12)
    return fig


def allocation_bars(plans: list[Allocation]) -> go.Figure:
    """Per-layer sparsity of each plan side by side (e.g. rate-distortion vs uniform)."""
    fig = go.Figure()
    for plan in plans:
        fig.add_bar(x=plan.layers, y=(plan.sparsities * 100).tolist(), name=f"{plan.method} ({plan.sparsity:.0%})",
                    hovertemplate="%{x}<br>sparsity %{y:.0f}%<extra></extra>")
    fig.update_layout(height=340, barmode="group", yaxis_title="sparsity (%)", yaxis_range=[0, 100],
                      xaxis_title="layer", margin=dict(t=20, b=10))
    return fig


def spectrum(values: torch.Tensor, name: str, cut: int | None = None) -> go.Figure:
    """Singular values of one weight, the kept rank marked."""
    fig = go.Figure(go.Scatter(x=list(range(1, len(values) + 1)), y=values.tolist(), mode="lines",
                               hovertemplate="index %{x}<br>singular value %{y:.4g}<extra></extra>"))
    if cut is not None:
        fig.add_vline(x=cut + 0.5, line_dash="dash", annotation_text=f"rank {cut}")
    fig.update_layout(height=300, xaxis_title=f"singular value index ({name})", yaxis_title="singular value",
                      yaxis_type="log", margin=dict(t=20, b=10))
    return fig


def search_progress(curve: list[float]) -> go.Figure:
    """Best KL to the base so far, per generation (it never rises)."""
    fig = go.Figure(go.Scatter(x=list(range(len(curve))), y=curve, mode="lines+markers",
                               hovertemplate="generation %{x}<br>best KL %{y:.4g}<extra></extra>"))
    fig.update_layout(height=300, xaxis_title="generation", yaxis_title="best KL(base ‖ pruned), nats",
                      xaxis_dtick=1, margin=dict(t=20, b=10))
    return fig
