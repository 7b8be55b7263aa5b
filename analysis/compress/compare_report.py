"""The exported report's "What the recipe changed" section: the lab page's section
(`ui.lab.compare`) as static HTML, from the same functions."""

from __future__ import annotations

import html

from analysis.compress import compare as cmp
from analysis.compress import compare_view as view
from analysis.compress.lab import Lab
from lib.data import TextBatch
from lib.errors import LayerScopeError


def changed_html(lab: Lab, plotly_js: bool = False) -> str:
    """Intervals, flipped answers, the KL strip of the window with the most KL, and (for a
    language model) the internals side by side, for the current recipe. plotly_js: inline
    plotly's JavaScript with the first figure (when no figure before it did)."""
    point = lab.current
    if point.spread is None:
        return "<p>This lab keeps no per-position scores.</p>"
    parts = [view.rows_html(view.spread_rows(lab.base_point, point)),
             f"<p>Intervals: {html.escape(point.spread.method)}. A change is called significant only when its "
             "interval excludes zero.</p>"]
    if not point.edits:
        return "".join(parts) + "<p>The recipe is empty: nothing has changed.</p>"
    if text := view.kl_quantile_text(point):
        parts.append(f"<p>{html.escape(text)}</p>")
    batch, scores = lab.batch, point.scores
    if lab.base.kind == "image-to-image":
        drops = cmp.psnr_drops(scores, lab.base_point.scores, limit=10)
        parts.append("<h3>The images whose PSNR fell most</h3>" + view.rows_html(
            [{"image": str(d.image), "base (dB)": f"{d.base_db:.2f}", "edited (dB)": f"{d.edited_db:.2f}",
              "change (dB)": f"{d.edited_db - d.base_db:+.2f}"} for d in drops]))
        return "".join(parts)
    shown, total = cmp.flips(scores, batch)
    parts.append(f"<h3>Flipped answers</h3><p>The top-1 answer changed at {total:,} of {len(scores.top1):,} "
                 f"{'predicted tokens' if isinstance(batch, TextBatch) else 'images'}; the {len(shown)} with the "
                 "largest KL:</p>")
    if not isinstance(batch, TextBatch):
        parts.append(view.rows_html([{"image": str(f.unit), "label": str(f.target), "base": str(f.base_top1),
                                      "edited": str(f.top1), "KL": f"{f.kl:.3g}"} for f in shown]))
        return "".join(parts)
    decode = view.token_decoder(lab.base)
    parts.append(view.flips_html(shown, batch, decode))
    worst = int(scores.kl.reshape(scores.n_units, -1).sum(1).argmax())
    parts.append(f"<h3>KL strip: window {worst} (the most KL)</h3>"
                 + view.kl_strip_html(batch.tokens[worst].tolist(), cmp.kl_strip(scores, worst), decode))
    few = cmp.internal_batch(batch)
    try:
        base, edited = cmp.depth_profile(lab.base, few), cmp.depth_profile(lab.edited(), few)
        roles = cmp.role_changes(lab.base, lab.edited(), batch)
    except LayerScopeError as e:
        return "".join(parts) + f"<p>Internals not compared: {html.escape(str(e))}</p>"
    parts.append(f"<h3>Internals, base and edited</h3><p>On {few.tokens.shape[0]} evaluation windows.</p>"
                 + view.depth_figure(base, edited).to_html(full_html=False, include_plotlyjs=plotly_js))
    parts.append(f"<h3>Head roles</h3><p>{html.escape(view.lost_sentence(roles))}</p>"
                 + view.rows_html(view.role_rows(roles)))
    return "".join(parts)
