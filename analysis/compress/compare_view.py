"""How the lab shows what a recipe changed (`analysis.compress.compare`): the metrics with
their intervals, the flipped answers in their text, the KL strip, and the internals side
by side, as plotly figures, HTML fragments and table rows the lab page and the exported
report share. Layout only, no streamlit. Every token's text is HTML-escaped here."""

from __future__ import annotations

import html
from typing import Callable, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analysis.compress.compare import DepthProfile, Flip, RoleChange
from analysis.compress.history import LabPoint, higher_is_better
from analysis.metric_text import metric_change, metric_value
from analysis.plots import integer_axis, token_label
from lib.data import TextBatch
from lib.metrics import LABELS
from lib.spread import SPREAD_FIELDS

BASE_COLOR, EDITED_COLOR = "#1f77b4", "#d62728"
CONTEXT_TOKENS = 40  # tokens of text shown before a flipped answer
Decode = Callable[[int], str]


def _interval(name: str, bounds: tuple[float, float] | None) -> str:
    if bounds is None:
        return "–"
    return f"{metric_value(name, bounds[0])} – {metric_value(name, bounds[1])}"


def spread_rows(base: LabPoint, point: LabPoint) -> list[dict[str, str]]:
    """One row per metric with an interval: base and edited value with their 95 %
    intervals, and the paired change with its interval and whether it is significant."""
    rows = []
    for name in SPREAD_FIELDS:
        value = getattr(point.metrics, name)
        if value is None or point.spread is None or name not in point.spread.intervals:
            continue
        if name in ("kl_to_base", "agreement") and not point.edits:
            continue  # the base against itself: 0 and 100 % exactly
        row = {"metric": LABELS[name], "base": "–", "base interval": "–",
               "edited": metric_value(name, value), "edited interval": _interval(name, point.spread.intervals[name]),
               "change": "–", "change interval": "–", "significant": "–"}
        base_value = getattr(base.metrics, name)
        if base_value is not None and base.spread is not None and name not in ("kl_to_base", "agreement"):
            row.update({"base": metric_value(name, base_value),
                        "base interval": _interval(name, base.spread.intervals.get(name))})
        if point.edits and name in ("kl_to_base", "agreement"):
            delta = value - (0.0 if name == "kl_to_base" else 1.0)
            row.update({"change": metric_change(name, delta), "change interval": row["edited interval"] if
                        name == "kl_to_base" else "–", "significant": "–"})
        elif point.edits and name in point.spread.deltas:
            delta = value - base_value
            low, high = point.spread.deltas[name]
            significant = point.spread.significant(name)
            better = (delta > 0) == higher_is_better(name)
            row.update({"change": metric_change(name, delta),
                        "change interval": f"{metric_change(name, low)} – {metric_change(name, high)}",
                        "significant": ("yes, " + ("better" if better else "worse")) if significant else "no"})
        rows.append(row)
    return rows


def kl_quantile_text(point: LabPoint) -> str | None:
    """The per-token KL distribution of an edited point in one line (None for the base)."""
    q = point.spread.kl_quantiles if point.spread is not None and point.edits else None
    if not q:
        return None
    return (f"KL(base || edited) per {'token' if point.spread.unit == 'window' else 'image'}: median "
            f"{q['median']:.3g}, p90 {q['p90']:.3g}, p99 {q['p99']:.3g}, max {q['max']:.3g} nats (mean "
            f"{point.metrics.kl_to_base:.3g}).")


def token_decoder(handle) -> Decode:
    """One token id -> its text, as the model's tokenizer writes it (no clean-up of spaces)."""
    tokenizer = handle.tokenizer
    return lambda token: tokenizer.decode([token], clean_up_tokenization_spaces=False)


# Token text: whitespace is drawn as visible marks, so a window has no break of its own; it
# wraps anywhere rather than run past the page.
_TEXT = "font-family:monospace;white-space:pre-wrap;overflow-wrap:anywhere"


def _piece(decode: Decode, token: int) -> str:
    return token_label(decode(token))


def flips_html(flips: Sequence[Flip], batch: TextBatch, decode: Decode, context: int = CONTEXT_TOKENS) -> str:
    """A table of flipped next-token answers, each in its text: the `context` tokens before
    it, the right next token marked, and what the base and the edited model predicted."""
    rows = []
    for f in flips:
        window = batch.tokens[f.unit].tolist()
        start = max(0, f.position + 1 - context)
        before = "".join(_piece(decode, t) for t in window[start:f.position + 1])
        rows.append(f"<tr><td>{f.unit}:{f.position + 1}</td><td>{f.kl:.3g}</td>"
                    f"<td style='{_TEXT}'>{'…' if start else ''}{before}"
                    f"<mark title='the next token'>{_piece(decode, f.target)}</mark></td>"
                    f"<td style='font-family:monospace'>{_piece(decode, f.base_top1)}</td>"
                    f"<td style='font-family:monospace'>{_piece(decode, f.top1)}</td></tr>")
    return ("<table><thead><tr><th>window:token</th><th>KL</th><th>text (next token marked)</th>"
            "<th>base predicts</th><th>edited predicts</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def kl_strip_html(tokens: Sequence[int], kl: torch.Tensor, decode: Decode, scale: float | None = None) -> str:
    """The window's text with each token shaded by the KL of the prediction made *of* it
    (position t's KL is the prediction of token t + 1), darker for more; the KL in its tooltip."""
    top = float(scale if scale is not None else max(float(kl.max()), 1e-9))
    spans = [f"<span>{_piece(decode, tokens[0])}</span>"]  # the first token is read, never predicted
    for token, value in zip(tokens[1:], kl.tolist()):
        alpha = min(1.0, value / top) if top > 0 else 0.0
        spans.append(f"<span title='KL {value:.3g}' style='background:rgba(214,39,40,{alpha:.2f})'>"
                     f"{_piece(decode, token)}</span>")
    return (f"<div style='{_TEXT};line-height:1.6'>" + "".join(spans)
            + f"</div><div style='font-size:0.8em;color:#666'>darkest: KL {top:.3g} nats</div>")


def depth_figure(base: DepthProfile, edited: DepthProfile) -> go.Figure:
    """Logit lens KL to the model's own output per depth, and each block's change
    1 - cos(h_l, h_{l+1}), for the base and the edited model."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("logit lens: KL to the model's output (nats)",
                                                        "change each block makes (1 − cos)"))
    depths = list(range(len(base.lens.kl)))
    for profile, name, color in ((base, "base", BASE_COLOR), (edited, "edited", EDITED_COLOR)):
        fig.add_trace(go.Scatter(x=depths, y=profile.lens.kl.tolist(), name=name, mode="lines+markers",
                                 line=dict(color=color), legendgroup=name), 1, 1)
        fig.add_trace(go.Bar(x=depths[:-1], y=profile.block_change.tolist(), name=name, marker_color=color,
                             legendgroup=name, showlegend=False), 1, 2)
    fig.update_layout(barmode="group", height=330, margin=dict(l=40, r=20, t=40, b=40))
    fig.update_xaxes(title_text="depth (stream entering block)", row=1, col=1, **integer_axis(len(depths)))
    fig.update_xaxes(title_text="block", row=1, col=2, **integer_axis(len(depths) - 1))
    return fig


ROLE_NAMES = {"previous_token": "previous-token", "duplicate_token": "duplicate-token", "induction": "induction"}


def role_rows(changes: Sequence[RoleChange]) -> list[dict[str, str]]:
    """Table rows: head, role, score in the base and the edited model, and what happened."""
    rows = []
    for c in changes:
        if c.edited_score is None:
            status = "removed"
        elif c.had:
            status = "kept its role" if c.kept else "lost its role"
        else:
            status = "gained the role" if c.kept else "no role in either"
        rows.append({"head": f"{c.layer}.{c.head}", "role": ROLE_NAMES[c.role], "base score": f"{c.base_score:.3f}",
                     "edited score": "–" if c.edited_score is None else f"{c.edited_score:.3f}", "": status})
    return rows


def rows_html(rows: Sequence[dict[str, str]]) -> str:
    """Rows (as `spread_rows`, `role_rows` give them) as an HTML table, every cell escaped."""
    if not rows:
        return "<p>–</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def lost_sentence(changes: Sequence[RoleChange]) -> str:
    """One sentence: how many heads with a role lost it, were removed, or kept it."""
    had = [c for c in changes if c.had]
    if not had:
        return "No head reaches a role's threshold in the base model on this probe."
    removed = sum(c.edited_score is None for c in had)
    lost = sum(c.edited_score is not None and not c.kept for c in had)
    return (f"Of the {len(had)} head role(s) the base has, {len(had) - removed - lost} kept, {lost} lost "
            f"(score below the threshold) and {removed} removed with their head.")
