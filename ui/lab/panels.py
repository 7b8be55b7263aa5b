"""The compression lab page's panels (`analysis.compress.lab`): the method controls, the
recipe list, metrics, history, per-layer view, downloads and upload, over this session's
`Lab` (`ui.session.session_lab`, which owns the recipe: drops sent from the Redundancy
page are already in it, and the sidebar reads it).

A change is applied first and only made current when it succeeded, so a bad edit or
file shows `st.error` and leaves the recipe as it was.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import streamlit as st

from analysis.compress import export
from analysis.compress import plots as plots_lab
from analysis.compress.edits import Edit
from analysis.compress.history import COSTS, LabPoint, higher_is_better
from analysis.compress.journal import frontier
from analysis.compress.lab import Lab
from analysis.compress.recipe import Recipe
from analysis.metric_text import size_text
from lib.errors import RecipeError
from lib.metrics import LABELS, input_psnr_db, model_inputs
from lib.progress import Progress
from ui import experiments
from ui.glossary import GLOSSARY
from ui.lab import methods_for
from ui.progress import Stopped, progress_bar
from ui.remember import keep, recall
from ui.session import app_message, change_recipe


def change(lab: Lab, label: str, act: Callable[[Progress], object]) -> bool:
    """Run one change of the lab's recipe with a progress bar; on success rerun the page
    (every panel, and the sidebar, then show it); on a user error show it here, leave
    everything as it was and return False."""
    if not change_recipe(label, act):
        return False
    st.rerun()


# ---------------------------------------------------------------------- controls and recipe


def add_edits(lab: Lab, edits: tuple[Edit, ...], progress: Progress) -> LabPoint:
    """Append several edits (a mixed-precision allocation's steps) as one change of the recipe."""
    recipe = lab.recipe
    if not [edit for edit in edits if recipe.add(edit)]:
        raise RecipeError("These edits are already in the recipe.")
    return lab.apply(recipe, progress)


def edit_controls(lab: Lab) -> None:
    """Method, its controls, and buttons that add the edit (or the edits, for controls that
    return several) or put it in place of the last one."""
    methods = methods_for(lab.base)
    names = [m.name for m in methods]
    recall("lab_method", lambda kept: kept in names)  # the method chosen before another page was visited
    name = keep("lab_method", st.selectbox("Method", names, key="lab_method"))
    chosen = next(m for m in methods if m.name == name)
    st.caption(chosen.help)
    try:
        edit = chosen.controls(lab.base, lab.edited())
    except RecipeError as e:
        st.error(app_message(e))
        edit = None
    except Stopped:  # a step the method needs was stopped: its notice is drawn
        edit = None
    edits = lab.recipe.edits
    last = edits[-1] if edits else None
    left, right = st.columns(2)
    if isinstance(edit, tuple):
        if left.button("Add to recipe", type="primary", disabled=not edit, key="lab_add", width="stretch"):
            change(lab, f"Adding {len(edit)} edit(s) to the recipe", lambda p: add_edits(lab, edit, p))
        edit = None  # several edits replace nothing
    elif left.button("Add to recipe", type="primary", disabled=edit is None, key="lab_add", width="stretch"):
        change(lab, "Adding it to the recipe", lambda p: lab.add(edit, p))
    can_replace = edit is not None and last is not None and type(last) is type(edit) and last != edit
    if right.button("Replace the last edit", disabled=not can_replace, key="lab_replace", width="stretch",
                    help="Put this edit in place of the last one of the same method; the edits before it are "
                         "not redone."):
        change(lab, "Replacing the last edit", lambda p: lab.replace(len(edits) - 1, edit, p))


def recipe_list(lab: Lab) -> None:
    """The edits in order, each movable and removable; undo, redo and reset."""
    edits = lab.recipe.edits
    if not edits:
        st.caption("No edits yet: the model is the loaded base model.")
    for i, edit in enumerate(edits):
        text, up, down, drop = st.columns([8, 1, 1, 1], vertical_alignment="center")
        text.markdown(f"**{i + 1}.** {edit.label}")  # not "1. x": markdown would make it a list
        if up.button("", icon=":material/arrow_upward:", key=f"lab_up_{i}", disabled=i == 0, help="Move up"):
            change(lab, "Reordering", lambda p: lab.move(i, i - 1, p))
        if down.button("", icon=":material/arrow_downward:", key=f"lab_down_{i}", disabled=i == len(edits) - 1,
                       help="Move down"):
            change(lab, "Reordering", lambda p: lab.move(i, i + 1, p))
        if drop.button("", icon=":material/close:", key=f"lab_remove_{i}", help=f"Remove '{edit.label}'"):
            change(lab, f"Removing {edit.label}", lambda p: lab.remove(i, p))
    undo, redo, reset = st.columns(3)
    if undo.button("Undo", icon=":material/undo:", key="lab_undo", disabled=not lab.can_undo, width="stretch"):
        change(lab, "Undoing", lab.undo)
    if redo.button("Redo", icon=":material/redo:", key="lab_redo", disabled=not lab.can_redo, width="stretch"):
        change(lab, "Redoing", lab.redo)
    if reset.button("Reset", icon=":material/restart_alt:", key="lab_reset", disabled=not edits, width="stretch"):
        change(lab, "Back to the base model", lab.reset)


# ---------------------------------------------------------------------- metrics


def _quality_items(lab: Lab) -> list[tuple[str, str, str | None, str, str]]:
    """(label, value, delta, delta colour, help) for the quality metrics this model has."""
    now, deltas, edited = lab.current.metrics, lab.deltas(), bool(lab.current.edits)
    items = []
    for name, fmt, helptext in (
            ("bits_per_byte", "{:.4f}", GLOSSARY["bits_per_byte"]), ("perplexity", "{:.4g}", GLOSSARY["perplexity"]),
            ("accuracy", "{:.1%}", "Share of correct top-1 predictions on the evaluation set."),
            ("psnr_db", "{:.2f}", GLOSSARY["psnr"])):
        value = getattr(now, name)
        if value is None:
            continue
        delta = deltas.get(name)
        if delta is not None and name == "accuracy":
            shown = f"{100 * delta:+.1f} points"
        else:
            shown = None if delta is None else fmt.replace("{:", "{:+").format(delta)
        colour, spread = "normal" if higher_is_better(name) else "inverse", lab.current.spread
        if spread is not None and name in spread.intervals:
            low, high = spread.intervals[name]
            helptext += f" 95 % interval here: {fmt.format(low)} – {fmt.format(high)}."
        if edited and spread is not None and spread.significant(name) is False:
            colour = "off"  # the paired interval of the change includes zero: within the evaluation's noise
            helptext += " The change is not significant: its paired 95 % interval includes zero."
        items.append((LABELS[name], fmt.format(value), shown if edited and delta else None, colour, helptext))
    if now.psnr_db is not None:  # a denoiser's PSNR means something only above its noisy input's
        items.append(("PSNR of the noisy input", f"{input_psnr_db(lab.batch):.2f}", None, "off",
                      GLOSSARY["noisy_psnr"]))
    return items


def _cost_items(lab: Lab) -> list[tuple[str, str, str | None, str, str]]:
    now, base = lab.current.metrics, lab.base_point.metrics
    items = []
    if now.kl_to_base is not None:
        items.append(("KL to base", f"{now.kl_to_base:.4g} nats", None, "off", GLOSSARY["kl"]))
        items.append(("top-1 agreement", f"{now.agreement:.1%}", None, "off", GLOSSARY["top1_agreement"]))
    items += _exit_items(lab)
    share = now.n_params / base.n_params
    items.append(("parameters kept", f"{now.n_params:,}", f"{share - 1:+.1%}" if share != 1 else None,
                  "inverse", "Weights the edited model still holds. Weights pruned to zero still count (they are "
                             "stored); removed heads, sublayers and blocks do not."))
    items.append(("size", size_text(now.size_bits),
                  size_text(now.size_bits - base.size_bits, signed=True) if now.size_bits != base.size_bits else None,
                  "inverse", "Bits to store the weights as they are stored, in MiB (GiB from 1 GiB on)."))
    return items + _latency_items(lab)


def _latency_items(lab: Lab) -> list[tuple[str, str, str | None, str, str]]:
    """Latency against the base, both timed in the same moment, and the FLOP prediction
    beside it: a change is shown only when it stands out of its own interval."""
    point, n = lab.current, len(model_inputs(lab.batch))
    change = point.latency
    if change is None:  # a lab that does not time against the base
        return [("latency", f"{point.metrics.latency_ms:.0f} ms", None, "off", "One forward over the batch.")]
    rows = change.base.over(n)
    if not point.edits:
        return [("latency", f"{change.base.median_ms:.0f} ms", None, "off",
                 f"Median of {change.base.runs} timed forwards over {rows} on this machine, after one untimed one; "
                 f"95 % interval of the median {change.base.low_ms:.0f}–{change.base.high_ms:.0f} ms.")]
    delta = change.text().split(" (")[0]  # without the interval: the delta pill cuts long text
    items = [("latency", f"{change.model.median_ms:.0f} ms", delta, "inverse" if change.measurable else "off",
              f"{GLOSSARY['latency_change']} Here: {change.text()} over {change.model.runs} pairs of forwards over "
              f"{rows}; the base took {change.base.median_ms:.0f} ms in the same moment."
              + (" The timings spread widely: the machine was busy, and a quieter moment gives a sharper answer."
                 if change.noisy else ""))]
    if change.predicted is not None:
        flops = "no change" if abs(change.predicted - 1) < 5e-4 else f"{change.predicted - 1:+.0%}"
        items.append(("FLOP prediction", flops, None, "off", GLOSSARY["flop_prediction"]))
    return items


def _exit_items(lab: Lab) -> list[tuple[str, str, str | None, str, str]]:
    """Mean exit layer and compute saved, for a recipe with an early exit (METHODS §6)."""
    exits = lab.current.exits
    if exits is None:
        return []
    simulated = (" The lab simulates the exits (every layer still runs, then each prediction is read out at its "
                 "exit), so latency does not show this saving.")
    items = [(f"mean exit layer (of {exits.n_layers})", f"{exits.mean_exit:.2f}", None, "off", GLOSSARY["exit_layer"]),
             ("compute saved", f"{exits.saved:.1%}", None, "off", GLOSSARY["compute_saved"] + simulated)]
    if lab.base.kind == "causal-lm":  # a classifier owes later tokens no keys and values: one number
        items.append(("compute saved (oracle)", f"{exits.saved_oracle:.1%}", None, "off", GLOSSARY["oracle_savings"]))
    return items


def metrics_panel(lab: Lab) -> None:
    """The current recipe's metrics, with changes against the base."""
    items = _quality_items(lab) + _cost_items(lab)
    cols = st.columns(4)
    for i, (label, value, delta, color, helptext) in enumerate(items):
        cols[i % 4].metric(label, value, delta, delta_color=color, help=helptext,
                           delta_arrow="off" if color == "off" else "auto")
    change = lab.current.latency
    if change is not None and lab.current.edits and not change.measurable:
        left, right = st.columns([4, 1], vertical_alignment="center")
        left.caption(f"Latency {change.text()} against the base: time it again when the machine is quieter.")
        if right.button("Time again", key="lab_time_again", width="stretch"):
            if change_recipe("Timing the model against the base", lab.time_again):
                st.rerun()
    if lab.current.exits is not None:
        st.caption("Early exits are simulated: every layer still runs and each prediction is then read out at its "
                   "exit, so latency does not fall here (the readouts are extra work); compute saved is what "
                   "stopping there would save.")


# ---------------------------------------------------------------------- history, layers


def history_view(lab: Lab) -> None:
    """Every recipe this visitor tried on this model (kept in the experiments database, so
    earlier sessions' too: `ui.experiments`), cost against quality, with the Pareto frontier;
    clicking a point (or choosing it in the list below) applies its recipe again, measured anew."""
    cost = st.radio("Cost", COSTS, horizontal=True, key="lab_cost",
                    format_func={"size_bits": "size", "latency_ms": "latency"}.get)
    points, _ = experiments.lab_history(lab)
    current = next(p.step for p in points if p.digest == lab.current.digest)
    figure = plots_lab.history_scatter(points, cost, lab.quality, frontier(points, cost, lab.quality), current)
    version = st.session_state.get("lab_chart_version", 0)
    event = st.plotly_chart(figure, on_select="rerun", selection_mode="points", key=f"lab_history_{version}",
                            width="stretch")
    step = _clicked_step(event)
    if step is not None and step < len(points):
        st.session_state["lab_chart_version"] = version + 1  # a new chart: the click is handled once
        if step != current:
            change(lab, "Restoring a recipe from the history", lambda p: _restore(lab, points[step], p))
    earlier = {p.digest for p in points} - {p.digest for p in lab.history}
    left, right = st.columns([4, 1], vertical_alignment="bottom")
    # no key: when the current step changes the list is a new widget that shows it
    chosen = left.selectbox("Restore a recipe from the history", range(len(points)), index=current,
                            format_func=lambda s: f"{s}: {points[s].label}"
                            + (" (earlier session)" if points[s].digest in earlier else ""))
    if right.button("Restore", key="lab_restore", disabled=chosen == current, width="stretch"):
        change(lab, "Restoring a recipe from the history", lambda p: _restore(lab, points[chosen], p))
    if earlier:
        st.caption(f"{len(earlier)} recipe(s) from earlier sessions show the numbers measured then, on this same "
                   "model and evaluation set; restoring one measures it again.")
    if experiments.journal_problem():
        st.caption(f":orange[This history is not being saved: {experiments.journal_problem()}]")


def _restore(lab: Lab, point: LabPoint, progress: Progress) -> LabPoint:
    return lab.apply(Recipe(lab.base.fingerprint, list(point.edits), model=lab.base.spec), progress)


def _clicked_step(event: object) -> int | None:
    try:
        points = event["selection"]["points"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    for point in points:
        data = point.get("customdata")
        data = data[0] if isinstance(data, list) and data else data
        if isinstance(data, (int, float)):
            return int(data)
    return None


def layer_view(lab: Lab) -> None:
    """Sparsity per linear layer, heads kept per block, and the edited model's card."""
    summary = lab.layer_summary()
    if summary.heads_kept is not None:
        left, right = st.columns([3, 2])
        left.plotly_chart(plots_lab.sparsity_bars(summary), width="stretch")
        right.plotly_chart(plots_lab.heads_bars(summary), width="stretch")
    else:
        st.plotly_chart(plots_lab.sparsity_bars(summary), width="stretch")
    removed = ", ".join(summary.removed_parts) or "nothing"
    st.caption(f"Bars: share of each linear layer's weights that are exactly zero (grey: removed). Removed: {removed}.")
    stored = Counter(s.format for s in lab.edited().storage.values() if not s.removed)
    if stored:
        st.caption("Stored quantized (the size counts codes, scales and zero points): "
                   + ", ".join(f"{n} weight(s) as {f}" for f, n in sorted(stored.items()))
                   + ". A quantized layer's bar also counts the weights its grid rounds to exactly zero.")
    with st.expander("The edited model's card"):
        rows = lab.edited().describe()
        st.table({"property": [r[0] for r in rows], "value": [r[1] for r in rows]})


# ---------------------------------------------------------------------- import, export


def downloads(lab: Lab) -> None:
    cols = st.columns(4)
    edits = lab.current.edits  # the zip made when the button is clicked holds these
    zip_name, report_name = export.file_name(lab, "model", "zip"), export.file_name(lab, "report", "html")
    cols[0].download_button("Model (zip)", experiments.noting_export(lab, lambda: export.lab_model_zip(lab, edits),
                                                                     zip_name),
                            zip_name, "application/zip", key="lab_get_model",
                            on_click="ignore", icon=":material/download:",
                            help="A checkpoint folder (safetensors, config.json, tokenizer, README.md) with removed "
                                 "blocks gone and quantized weights stored quantized where plain transformers reads "
                                 "them; README.md says per edit what is realised in storage, in compute or simulated "
                                 "only.")
    cols[1].download_button("Recipe (JSON)", lab.recipe.to_json(), export.file_name(lab, "recipe", "json"),
                            "application/json", key="lab_get_recipe", on_click="ignore", icon=":material/download:")
    cols[2].download_button("History (CSV)", lab.history_csv(), export.file_name(lab, "history", "csv"), "text/csv",
                            key="lab_get_history", on_click="ignore", icon=":material/download:")
    cols[3].download_button("Report (HTML)", experiments.noting_export(lab, lambda: export.html_report(lab),
                                                                       report_name), report_name, "text/html",
                            key="lab_get_report", on_click="ignore", icon=":material/download:",
                            help="Metrics, history and figures in one page that opens offline.")
    note = export.export_note(lab.edited())
    if note:
        st.caption(f":orange[{note}] The zip holds this note too.")
    export_check(lab, edits)


def export_check(lab: Lab, edits: tuple[Edit, ...]) -> None:
    """The export loaded back (plain transformers where it can): its size, metrics and latency beside the lab's."""
    from analysis.compress.export_check import check_export

    key = ("lab_export_check", lab.base.fingerprint, lab.batch.digest, lab.current.digest)
    if lab.base.kind == "causal-lm" and st.button("Load the export back and measure it", key="lab_check_export"):
        try:
            with progress_bar("Checking the export", lambda: st.toast("Stopped checking the export.")) as bar:
                st.session_state["lab_export_check"] = (key, check_export(lab, edits, progress=bar))
        except Exception as e:  # noqa: BLE001 - any failure of transformers' loader on the written files is reported
            first = (str(e).splitlines() or [""])[0][:300]
            st.error(f"The export could not be loaded back ({type(e).__name__}): {first}")
    shown = st.session_state.get("lab_export_check")
    if shown and shown[0] == key:
        st.table(shown[1].rows(lab.quality))
        st.caption(shown[1].caption(lab.quality))


def upload(lab: Lab) -> None:
    """A recipe file: applied to the loaded base model if it was made for it."""
    version = st.session_state.get("lab_upload_version", 0)
    file = st.file_uploader("Apply a recipe file (JSON saved by the lab)", type=["json"],
                            key=f"lab_upload_{version}")
    if file is not None:
        st.session_state["lab_upload_version"] = version + 1  # applied: a fresh uploader, so it applies once
        if not change(lab, f"Applying {file.name}",
                      lambda p: lab.apply(export.read_recipe(file.getvalue(), lab.base), p)):
            # refused: this uploader stays (with the file and the message), so the next file lands in it
            st.session_state["lab_upload_version"] = version
