"""The lab page's table of this visitor's experiments on the loaded model, read from the
experiments database (`ui.experiments`): every recipe tried in this session and earlier
ones, downloadable as CSV, each row deletable."""

from __future__ import annotations

import time

import streamlit as st

from analysis.compress import export
from analysis.compress.journal import MAX_ROWS_PER_MODEL, Experiment, experiments_csv
from analysis.compress.lab import Lab
from analysis.metric_text import metric_value
from lib.metrics import LABELS
from ui import experiments


def _table(rows: list[Experiment], quality: str) -> dict[str, list[object]]:
    """Columns as the page shows them: a stored row's numbers as measured then."""
    columns: dict[str, list[object]] = {"recipe": [], LABELS[quality]: [], "KL to base": [], "size (MiB)": [],
                                         "latency vs base": [], "last measured (UTC)": [], "exported": []}
    for row in rows:
        m, change = row.metrics, row.latency
        value = getattr(m, quality) if m is not None else None
        columns["recipe"].append(row.label)
        columns[LABELS[quality]].append(None if value is None else metric_value(quality, value))
        columns["KL to base"].append(None if m is None or m.kl_to_base is None else f"{m.kl_to_base:.4g}")
        columns["size (MiB)"].append(None if m is None else round(m.size_bits / 8 / 2**20, 3))
        columns["latency vs base"].append(change.text() if change is not None and row.digest else "")
        columns["last measured (UTC)"].append(time.strftime("%Y-%m-%d %H:%M", time.gmtime(row.updated)))
        columns["exported"].append(", ".join(row.exported))
    return columns


def experiments_view(lab: Lab) -> None:
    """This visitor's stored experiments on this model: a table, a CSV of every number, and
    deleting a row (the current recipe's row comes back when it is measured again)."""
    _, rows = experiments.lab_history(lab)
    with st.expander(f"Your experiments on this model ({len(rows)} kept)", icon=":material/history:"):
        if not rows:
            st.caption("Nothing is kept: " + (experiments.journal_problem() or "no recipe was measured yet."))
            return
        st.dataframe(_table(rows, lab.quality), hide_index=True, width="stretch")
        left, middle, right = st.columns([2, 3, 1], vertical_alignment="bottom")
        left.download_button("Experiments (CSV)", experiments_csv(rows), export.file_name(lab, "experiments", "csv"),
                             "text/csv", key="lab_get_experiments", on_click="ignore", icon=":material/download:",
                             help="Every number of every kept recipe, when it was measured, what was exported.")
        deletable = {row.id: row for row in rows if row.digest and row.digest != lab.current.digest}
        chosen = middle.selectbox("Forget a recipe", list(deletable), index=None, key="lab_forget_choice",
                                  format_func=lambda i: deletable[i].label, placeholder="choose a kept recipe")
        if right.button("Forget", key="lab_forget", disabled=chosen is None, width="stretch"):
            experiments.forget(lab, chosen, deletable[chosen].digest)
            st.rerun()
        st.caption(f"Kept in the experiments database under your visitor id, at most {MAX_ROWS_PER_MODEL} recipes "
                   "per model (the least recently measured go first). Other visitors do not see them; a link you share "
                   "carries one recipe, never this list.")

