"""The lab page's "What the recipe changed" section: the metrics with their intervals,
the answers that flipped (in their text, or the images), the KL strip over a window, and
the internals of the base and the edited model side by side (`analysis.compress.compare`)."""

from __future__ import annotations

from typing import Callable

import streamlit as st

from analysis import plots
from analysis.compress import compare as cmp
from analysis.compress import compare_view as view
from analysis.compress.lab import Lab
from analysis.metric_text import duration_text
from lib.data import TextBatch
from lib.errors import LayerScopeError
from lib.progress import Progress
from ui.cache import base_forward_seconds
from ui.glossary import GLOSSARY
from ui.progress import Stopped, counting_blocks, stored
from ui.session import app_message

INTERNALS_ON_S = 10.0  # the internals start on where one model's take at most this many seconds


def intervals(lab: Lab) -> None:
    """Every metric of the base and the current recipe with its bootstrap interval, the
    paired change and whether it is significant; the per-token KL's quantiles."""
    point = lab.current
    if point.spread is None:
        return
    st.dataframe(view.spread_rows(lab.base_point, point), hide_index=True, width="stretch")
    st.caption(f"Intervals: {point.spread.method}. A change is called significant only when its interval "
               "excludes zero.", help=GLOSSARY["bootstrap"])
    if text := view.kl_quantile_text(point):
        st.caption(text + " The mean hides where the damage is: a few positions can carry most of it.")


def flipped(lab: Lab) -> None:
    """The answers the recipe changed, worst KL first (text in context, or images), or a
    denoiser's images whose PSNR fell most."""
    point, batch = lab.current, lab.batch
    if point.scores is None or not point.edits:
        st.caption("With an empty recipe nothing has changed: add an edit to see which answers it flips.")
        return
    if lab.base.kind == "image-to-image":
        drops = cmp.psnr_drops(point.scores, lab.base_point.scores, limit=5)
        st.markdown("**The images whose PSNR fell most**")
        if drops:
            edited = lab.edited().forward(batch.images[[d.image for d in drops[:3]]])
            for d, out in zip(drops[:3], edited):
                cols = st.columns(4)
                cols[0].plotly_chart(plots.image_heatmap(batch.images[d.image], f"input {d.image}"))
                cols[1].plotly_chart(plots.image_heatmap(out.detach(), f"edited: {d.edited_db:.1f} dB"))
                cols[2].plotly_chart(plots.image_heatmap(batch.targets[d.image], "clean target"))
                cols[3].metric("PSNR change", f"{d.edited_db - d.base_db:+.2f} dB", help=f"base {d.base_db:.2f} dB")
        return
    shown, total = cmp.flips(point.scores, batch)
    n = len(point.scores.top1)
    what = "predicted tokens" if isinstance(batch, TextBatch) else "images"
    st.markdown(f"**Flipped answers**: the top-1 answer changed at {total:,} of {n:,} {what} "
                f"({total / n:.1%}); the {len(shown)} with the largest KL:")
    if not shown:
        return
    if isinstance(batch, TextBatch):
        st.html(view.flips_html(shown, batch, view.token_decoder(lab.base)))
        st.caption(f"Each row: the text before the position, the right next token highlighted, and what each "
                   f"model predicts. Whitespace is shown as {plots.WHITESPACE_NOTE}.")
        return
    cols = st.columns(4)
    for i, f in enumerate(shown[:8]):
        title = f"image {f.unit} (label {f.target}): base {f.base_top1} → {f.top1}"
        cols[i % 4].plotly_chart(plots.image_heatmap(batch.images[f.unit], title), key=f"lab_flip_{i}")


def kl_strip(lab: Lab) -> None:
    """One evaluation window's tokens shaded by the KL at each position."""
    point, batch = lab.current, lab.batch
    if point.scores is None or point.scores.kl is None or not isinstance(batch, TextBatch) or not point.edits:
        return
    worst = int(point.scores.kl.reshape(point.scores.n_units, -1).sum(1).argmax())
    window = st.selectbox("KL strip: window", range(point.scores.n_units), index=worst, key="lab_kl_window",
                          help="Which evaluation window to show; the one with the most KL is chosen first.")
    strip = cmp.kl_strip(point.scores, window)
    st.html(view.kl_strip_html(batch.tokens[window].tolist(), strip, view.token_decoder(lab.base),
                               scale=float(point.scores.kl.max())))
    st.caption("Each token is shaded by KL(base || edited) of the prediction of it (hover for the number); the "
               "shading is on one scale for every window.")


def internals(lab: Lab) -> None:
    """The logit lens, each block's change and the head roles of base and edited model."""
    point = lab.current
    if lab.base.kind != "causal-lm" or not point.edits:
        return
    seconds = internals_seconds(lab)
    slow = seconds is not None and seconds > INTERNALS_ON_S
    label = "Compare internals: logit lens, block changes and head roles"
    if not st.toggle(label + (f" ({duration_text(seconds)} after each change here)" if slow else ""), value=not slow,
                     key="lab_internals", help="The Redundancy and Channels pages' computations run on the edited "
                     "copy, beside the base's, on the first evaluation windows. Off at first where they would take "
                     f"over {INTERNALS_ON_S:.0f} s after each change (estimated from the base's measured forward)."):
        return
    batch = cmp.internal_batch(lab.batch)

    def read(key: tuple, label: str, compute: Callable, copy: bool, forwards: int | None = 1):
        """`compute(base)`, or `compute(base, edited copy)` with `copy`, under a bar with a Stop
        that counts the blocks of the models it runs (`forwards` None: `compute` moves the bar
        itself, as its last argument)."""
        def run(step: Progress):
            models = (lab.base, lab.edited()) if copy else (lab.base,)
            if forwards is None:
                return compute(*models, step)
            with counting_blocks(models, step, forwards):
                return compute(*models)

        return stored(key, run, label, stop="Nothing of it is kept: going on reads it again.")

    try:
        base = read(("compare_depth", lab.base.fingerprint, batch.digest), "Reading the base model's internals",
                    lambda base, step: cmp.depth_profile(base, batch, progress=step), copy=False, forwards=None)
        edited = read(("compare_depth", lab.base.fingerprint, point.digest, batch.digest),
                      "Reading the edited model's internals",
                      lambda _, copy, step: cmp.depth_profile(copy, batch, progress=step), copy=True, forwards=None)
        roles = read(("compare_roles", lab.base.fingerprint, lab.batch.digest, point.digest),
                     "Comparing the head roles of both", lambda base, copy: cmp.role_changes(base, copy, lab.batch),
                     copy=True, forwards=2)
    except Stopped:  # its notice is drawn, with the button that goes on
        return
    except LayerScopeError as e:
        st.info(app_message(e))
        return
    st.plotly_chart(view.depth_figure(base, edited), width="stretch", key="lab_depth_compare")
    st.caption(f"On {batch.tokens.shape[0]} evaluation windows. Left: how far each depth's logit-lens reading is "
               "from the model's own output (0 at the last depth). Right: how much each block changes the residual "
               "stream; a removed block changes nothing." + (f" Removed: {', '.join(edited.removed)}."
                                                               if edited.removed else ""))
    st.markdown("**Head roles, base and edited** · " + view.lost_sentence(roles))
    st.dataframe(view.role_rows(roles), hide_index=True, width="stretch")
    st.caption("Scores on the Channels page's repeated-token probe; a head has a role when its score reaches the "
               "role's threshold.", help=GLOSSARY["head_roles"])


def internals_seconds(lab: Lab) -> float | None:
    """Seconds reading one model's internals takes here, from the base's measured forward
    (None before the base was measured in this process)."""
    forward = base_forward_seconds(lab.base)
    return None if forward is None else forward * cmp.internals_in_forwards(lab.base, lab.batch)


def what_changed(lab: Lab) -> None:
    """The whole section, in reading order."""
    intervals(lab)
    flipped(lab)
    kl_strip(lab)
    internals(lab)

