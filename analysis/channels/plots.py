"""Figures of the Channels view, built from `circuits` / `heads` results
(conventions in `analysis.plots`: no title where the page header says it, every colour
bar titled, integer axes on whole numbers)."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analysis.channels.circuits import Channel, ChannelComponents, Circuits, Composition, head_label
from analysis.channels.heads import REGIMES, HeadRoles, head_role
from analysis.plots import integer_axis, token_label

ROLE_TITLES = {"previous_token": "previous token", "duplicate_token": "duplicate token", "induction": "induction",
               "sink": "sink (position 0)"}
_REGIME_COLORS = ("#9ecae1", "#fdae6b", "#d62728")  # global averaging, metastable, single pattern
_SELECTED = "#d62728"
# a click selects a point (the page reads it); plotly would then fade every other point
_NO_DIMMING = dict(selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=1)))
_CLEAR = "rgba(0,0,0,0)"  # still hovered and clicked: plotly picks points by position


def _parse(label: str) -> tuple[int, int]:
    """"L3H7" -> (3, 7)."""
    layer, head = label[1:].split("H")
    return int(layer), int(head)


def _cell_text(values: torch.Tensor) -> list[list[str]]:
    return [[f"{v:.2f}" for v in row] for row in values.tolist()]


def role_grid(roles: HeadRoles) -> go.Figure:
    """One [layer, head] grid per role score (0..1, numbers in the cells) and one of the
    Hopfield regime."""
    L, H = roles.previous_token.shape
    titles = [ROLE_TITLES[k] for k in HeadRoles.SCORES] + ["Hopfield regime"]
    fig = make_subplots(rows=1, cols=5, subplot_titles=titles, horizontal_spacing=0.03)
    heads, layers = list(range(H)), list(range(L))
    for i, key in enumerate(HeadRoles.SCORES):
        values = getattr(roles, key)
        fig.add_trace(go.Heatmap(
            z=values.tolist(), x=heads, y=layers, zmin=0, zmax=1, colorscale="Blues", showscale=i == 0,
            text=_cell_text(values), texttemplate="%{text}" if L * H <= 64 else None,
            colorbar=dict(title=dict(text="score"), len=0.9, x=1.01),
            hovertemplate=f"L%{{y}}H%{{x}}<br>{ROLE_TITLES[key]} %{{z:.3f}}<extra></extra>"), 1, i + 1)
    n = len(REGIMES)
    scale = [[j / n + edge / n, _REGIME_COLORS[j]] for j in range(n) for edge in (0, 1)]
    names = [[REGIMES[int(r)] for r in row] for row in roles.regime.tolist()]
    fig.add_trace(go.Heatmap(
        z=roles.regime.tolist(), x=heads, y=layers, zmin=-0.5, zmax=n - 0.5, colorscale=scale, showscale=False,
        customdata=[[(name, f"{k:.1f}", f"{f:.2f}") for name, k, f in zip(*rows)]
                    for rows in zip(names, roles.keys_90.tolist(), roles.key_fraction.tolist())],
        hovertemplate="L%{y}H%{x}: %{customdata[0]}<br>keys for 90%: %{customdata[1]}"
                      "<br>share of keys: %{customdata[2]}<extra></extra>"), 1, 5)
    for j, name in enumerate(REGIMES):  # a legend for the regime colours
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, showlegend=True,
                                 marker=dict(size=12, symbol="square", color=_REGIME_COLORS[j])), 1, 5)
    fig.update_yaxes(autorange="reversed", title_text="layer", row=1, col=1, **integer_axis(L))
    for col in range(2, 6):
        fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=col, **integer_axis(L))
    fig.update_xaxes(title_text="head", **integer_axis(H))
    fig.update_layout(height=210 + 26 * max(L, 4), margin=dict(t=40, b=40, l=60, r=10),
                      legend=dict(orientation="h", yanchor="top", y=-0.4, x=1, xanchor="right"))
    return fig


_LABEL_PX = 12  # room one head label ("L5H3", 10 px font) needs across its axis, rotated on x
_HEATMAP_WIDTH_PX = 420  # the plot area of a half-width column on a wide page, colour bar excluded


def _head_ticks(labels: list[str], length_px: float) -> dict:
    """Explicit ticks for a category axis of head labels: every head while each gets
    `_LABEL_PX` of `length_px`, else every n-th. Left to itself plotly thins category
    labels as it likes (it named only every other reader head of a 6-layer model)."""
    step = max(1, math.ceil(len(labels) * _LABEL_PX / length_px))
    return dict(tickmode="array", tickvals=labels[::step], ticktext=labels[::step], tickfont=dict(size=10))


# Pairs a click marker is drawn for: GPT-2 small has 9,504; Llama-3.2-1B has 122,880, an 8.6 MB figure of as
# many SVG markers that took 9 s to build here
CLICKABLE_CELLS = 20_000
_SCORE = "%{z:.2f}× the random baseline"


def cells_clickable(comp: Composition) -> bool:
    """Whether `composition_heatmap` draws a click marker on each pair (CLICKABLE_CELLS)."""
    return int(comp.valid[:-1, :, 1:].sum()) <= CLICKABLE_CELLS


def composition_heatmap(comp: Composition, mode: str, selected: Channel | None = None) -> go.Figure:
    """Writers (rows: layers 0..L-2) x readers (columns: layers 1..L-1), score / random
    baseline; pairs that cannot compose (reader not in a later layer) are blank. Cells can
    be clicked up to CLICKABLE_CELLS pairs; beyond, they only show their score on hover."""
    L, H = comp.scores[mode].shape[:2]
    writers = [head_label((l, h)) for l in range(L - 1) for h in range(H)]
    readers = [head_label((l, h)) for l in range(1, L) for h in range(H)]
    rel = comp.relative(mode)[:-1, :, 1:].reshape(len(writers), len(readers))
    valid = comp.valid[:-1, :, 1:].reshape(len(writers), len(readers))
    z = [[float(v) if ok else None for v, ok in zip(row, oks)] for row, oks in zip(rel.tolist(), valid.tolist())]
    clickable = cells_clickable(comp)
    fig = go.Figure(go.Heatmap(
        z=z, x=readers, y=writers, zmin=0, colorscale="Viridis", colorbar=dict(title=dict(text="× baseline")),
        hoverinfo="skip" if clickable else None, hoverongaps=False,
        hovertemplate=None if clickable else f"writer %{{y}} → reader %{{x}}<br>{_SCORE}<extra></extra>"))
    height = min(760, 260 + 9 * (L - 1) * H)
    if clickable:
        # plotly cannot select heat-map cells: an invisible marker on each valid cell carries
        # hover and click (customdata: writer layer, head, reader layer, head)
        cells = [(w, r) for i, w in enumerate(writers) for j, r in enumerate(readers) if valid[i, j]]
        fig.add_trace(go.Scatter(
            x=[r for _, r in cells], y=[w for w, _ in cells], mode="markers", showlegend=False,
            marker=dict(symbol="square", size=max(6.0, min(40.0, 0.8 * (height - 120) / len(writers))),
                        color=_CLEAR),
            customdata=[[*_parse(w), *_parse(r), float(rel[i, j])] for i, w in enumerate(writers)
                        for j, r in enumerate(readers) if valid[i, j]],
            hovertemplate="writer %{y} → reader %{x}<br>" + _SCORE.replace("z", "customdata[4]") + "<extra></extra>",
            selected=dict(marker=dict(color=_CLEAR)), unselected=dict(marker=dict(color=_CLEAR))))
    if selected is not None:
        fig.add_trace(go.Scatter(x=[selected.reader_label], y=[selected.writer_label], mode="markers",
                                 marker=dict(symbol="square-open", size=14, color=_SELECTED, line=dict(width=3)),
                                 hoverinfo="skip", showlegend=False, **_NO_DIMMING))
    fig.update_layout(height=height, margin=dict(t=10, b=10),
                      xaxis=dict(title="reader head", type="category", tickangle=-90,
                                 **_head_ticks(readers, _HEATMAP_WIDTH_PX)),
                      yaxis=dict(title="writer head", type="category", autorange="reversed",
                                 **_head_ticks(writers, height - 120)))  # less the margins and reader labels
    return fig


def _node_role(roles: HeadRoles | None, layer: int, head: int) -> str:
    """The head's role and score ("induction 0.62") by `heads.ROLE_THRESHOLDS`, as the
    page's sentences name it; "" when it has none."""
    held = head_role(roles, (layer, head)) if roles is not None else None
    return f"{ROLE_TITLES[held[0]]} {held[1]:.2f}" if held else ""


def channel_graph(comp: Composition, mode: str, n: int, roles: HeadRoles | None = None,
                  selected: Channel | None = None) -> go.Figure:
    """Heads as nodes (x: layer, y: head), the n strongest `mode` channels as edges
    (width by score / baseline; the selected one red) with a marker near the writer end to
    hover or click; a head with a role (`heads.ROLE_THRESHOLDS`) orange, its role in the hover."""
    L, H = comp.scores[mode].shape[:2]
    top = comp.strongest(mode, n)
    peak = max((c.relative for c in top), default=1.0)
    fig = go.Figure()
    for c in reversed(top):  # strongest drawn last, on top
        chosen = selected is not None and (c.writer, c.reader) == (selected.writer, selected.reader)
        fig.add_trace(go.Scatter(
            x=[c.writer[0], c.reader[0]], y=[c.writer[1], c.reader[1]], mode="lines", showlegend=False,
            line=dict(width=1 + 7 * c.relative / peak, color=_SELECTED if chosen else "rgba(31,119,180,0.55)"),
            hoverinfo="skip"))
    # one handle per edge to hover and click, 30% of the way from the writer (midpoints of
    # crossing edges often coincide: L0H0 -> L1H2 and L0H1 -> L1H1 share theirs)
    handles = [(0.7 * c.writer[0] + 0.3 * c.reader[0], 0.7 * c.writer[1] + 0.3 * c.reader[1], c) for c in top]
    fig.add_trace(go.Scatter(
        x=[m[0] for m in handles], y=[m[1] for m in handles], mode="markers", showlegend=False,
        marker=dict(size=9, color="white", line=dict(width=2, color="#1f77b4")),
        text=[f"{m[2].label}: {m[2].relative:.2f}× baseline" for m in handles],
        customdata=[[*m[2].writer, *m[2].reader] for m in handles], hovertemplate="%{text}<extra></extra>",
        **_NO_DIMMING))
    nodes = [(l, h) for l in range(L) for h in range(H)]
    roles_text = [_node_role(roles, l, h) for l, h in nodes]
    fig.add_trace(go.Scatter(
        x=[l for l, _ in nodes], y=[h for _, h in nodes], mode="markers", showlegend=False,
        marker=dict(size=22 if L * H <= 64 else 12, color=["#ff7f0e" if t else "#c7c7c7" for t in roles_text],
                    line=dict(width=1, color="#444")),
        customdata=roles_text, hovertemplate="L%{x}H%{y}<br>%{customdata}<extra></extra>",
        **_NO_DIMMING))
    if L * H <= 64:  # labels as annotations on a white ground: drawn above the edges, readable where one passes
        for l, h in nodes:
            fig.add_annotation(x=l, y=h, text=head_label((l, h)), showarrow=False, xanchor="left", xshift=13,
                               bgcolor="rgba(255,255,255,0.85)", font=dict(size=11), borderpad=1)
    fig.update_layout(height=max(300, 60 + 42 * H), margin=dict(t=10, b=10),
                      xaxis=dict(title="layer", range=[-0.4, L - 0.4], **integer_axis(L)),
                      yaxis=dict(title="head", autorange="reversed", **integer_axis(H)))
    return fig


def component_bars(parts: ChannelComponents) -> go.Figure:
    """Per writer-OV component: score against the reader / baseline (bars, the dashed line
    is the random baseline), each bar's share of the pair's composition written above it;
    the component's singular value in a panel of its own underneath, so its markers never
    sit on a share label."""
    r = parts.scores.numel()
    comps = list(range(r))
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.72, 0.28], vertical_spacing=0.06)
    fig.add_trace(go.Bar(
        x=comps, y=parts.relative.tolist(), name="score / baseline", marker_color="#1f77b4",
        text=[f"{s:.0%}" if s >= 0.02 else "" for s in parts.shares.tolist()], textposition="outside",
        cliponaxis=False, customdata=list(zip(parts.shares.tolist(), parts.singular_values.tolist())),
        hovertemplate="component %{x}: %{y:.2f}× baseline<br>share of the composition %{customdata[0]:.1%}"
                      "<br>singular value %{customdata[1]:.3g}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=comps, y=parts.singular_values.tolist(), name="singular value s_i",
                             mode="lines+markers", line=dict(color="#ff7f0e"),
                             hovertemplate="component %{x}: s_i %{y:.3g}<extra></extra>"), row=2, col=1)
    fig.add_hline(y=1.0, line_dash="dash", line_color="#555", annotation_text="random baseline",
                  annotation_position="top right", row=1, col=1)
    fig.update_xaxes(title_text=f"component of {parts.channel.writer_label}'s OV (strongest first)", row=2, col=1,
                     **integer_axis(r))
    fig.update_xaxes(row=1, col=1, **integer_axis(r))
    top = float(parts.relative.max()) if r else 1.0
    fig.update_yaxes(title_text=f"score vs {parts.channel.reader_label} / baseline", row=1, col=1,
                     range=[0, max(1.2, top) * 1.15])
    fig.update_yaxes(title_text="s_i", row=2, col=1, rangemode="tozero", tickformat=".2g", nticks=3)
    fig.update_layout(height=420, margin=dict(t=10, b=10), bargap=0.2, legend=dict(orientation="h", y=1.1, x=0))
    return fig


def pattern_heatmap(pattern: torch.Tensor, tokens: list[str], title: str = "", max_height: int = 1100) -> go.Figure:
    """An attention pattern [T, T] (query rows, key columns) with the tokens as axis labels
    (positions as ticks, so repeated tokens stay apart): every token while each gets at
    least 9 px, else every n-th. max_height: e.g. smaller for two patterns side by side."""
    T = pattern.shape[0]
    labels = [token_label(t) for t in tokens]
    z = [[float(v) if k <= q else None for k, v in enumerate(row)] for q, row in enumerate(pattern.tolist())]
    height = min(max_height, 220 + (16 if T <= 40 else 11) * T)
    step = max(1, math.ceil(T * 9 / (height - 200)))
    ticks = dict(tickmode="array", tickvals=list(range(0, T, step)), ticktext=labels[::step],
                 tickfont=dict(size=11 if T <= 40 else 9))
    fig = go.Figure(go.Heatmap(
        z=z, zmin=0, zmax=1, colorscale="Blues", colorbar=dict(title=dict(text="attention")),
        customdata=[[(labels[q], labels[k]) for k in range(T)] for q in range(T)],
        hovertemplate="query %{y} %{customdata[0]} → key %{x} %{customdata[1]}<br>attention %{z:.3f}"
                      "<extra></extra>"))
    fig.update_layout(title=title or None, height=height, margin=dict(t=40 if title else 10, b=10),
                      xaxis=dict(title="key (attended to)", tickangle=-90, constrain="domain", **ticks),
                      yaxis=dict(title="query", autorange="reversed", scaleanchor="x", constrain="domain",
                                 **ticks))  # square cells
    return fig


def spectra_heatmap(c: Circuits) -> go.Figure:
    """Singular values of every head's OV and QK circuit, each head's row divided by its
    largest, so a fast fall-off (a low-rank circuit) reads as a short bright start."""
    L, H, r = c.ov_S.shape
    labels = [head_label((l, h)) for l in range(L) for h in range(H)]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["OV = W_V W_O", "QK = W_Q W_Kᵀ"], horizontal_spacing=0.08)
    for col, s in enumerate((c.ov_S, c.qk_S), start=1):
        s = s.reshape(L * H, r)
        norm = s / s[:, :1].clamp_min(1e-30)
        fig.add_trace(go.Heatmap(
            z=norm.tolist(), x=list(range(r)), y=labels, zmin=0, zmax=1, colorscale="Magma", showscale=col == 1,
            customdata=s.tolist(), colorbar=dict(title=dict(text="s_i / s_0")),
            hovertemplate="%{y} component %{x}<br>s_i %{customdata:.3g} (%{z:.2f} of s_0)<extra></extra>"), 1, col)
        fig.update_xaxes(title_text="component", row=1, col=col, **integer_axis(r))
        fig.update_yaxes(type="category", autorange="reversed", showticklabels=col == 1, row=1, col=col)
    fig.update_layout(height=min(720, 200 + 10 * L * H), margin=dict(t=40, b=10))
    return fig
