"""What leaves the compression lab: the edited model as a zipped checkpoint folder, the
recipe as JSON (and reading one back), the history as CSV, and a self-contained HTML
report. File names are made safe from whatever the model was called.
"""

from __future__ import annotations

import html

from analysis.compress import plots as plots_lab
from analysis.compress.checkpoint_export import (  # noqa: F401 - the model export lives there; callers import it here
    NOTE_FILE,
    RECIPE_FILE,
    export_note,
    lab_model_zip,
    measured_for,
    model_zip,
    safe_name,
    write_folder,
)
from analysis.compress.compare_report import changed_html
from analysis.compress.lab import Lab
from analysis.compress.recipe import Recipe, check_for
from analysis.metric_text import metric_change, metric_value
from lib.errors import RecipeError
from lib.handle import ModelHandle
from lib.metrics import LABELS


def file_name(lab: Lab, what: str, suffix: str) -> str:
    """`<model>-<recipe digest or base>-<what>.<suffix>`, e.g. `zoo_code-lm-3f2a...-recipe.json`."""
    return f"{safe_name(lab.base.spec)}-{lab.current.digest or 'base'}-{what}.{suffix}"


# ---------------------------------------------------------------------- recipe


def read_recipe(text: str | bytes, base: ModelHandle) -> Recipe:
    """A recipe file (JSON) checked against `base`: bad JSON, unknown fields, wrong types
    and recipes made for another model are refused with a RecipeError saying which."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(f"The recipe file is not UTF-8 text ({e}); upload the .json file the lab saved.") from e
    recipe = Recipe.from_json(text)
    check_for(recipe, base)
    return recipe


# ---------------------------------------------------------------------- report


def _cell(value: object, metric: str = "") -> str:
    """A table cell: a metric's float as pages show it (`metric_value`: accuracy in percent,
    never scientific notation at ordinary magnitudes)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return metric_value(metric, value)
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def metrics_table(lab: Lab) -> str:
    """An HTML table: each metric of the base, the current recipe, and the change."""
    base, now, deltas = lab.base_point.metrics, lab.current.metrics, lab.deltas()
    rows = []
    for name, label in LABELS.items():
        if getattr(base, name) is None:
            continue
        delta = deltas.get(name)
        rows.append(f"<tr><td>{html.escape(label)}</td><td>{_cell(getattr(base, name), name)}</td>"
                    f"<td>{_cell(getattr(now, name), name)}</td>"
                    f"<td>{'' if delta is None else metric_change(name, delta)}</td></tr>")
    return ("<table><thead><tr><th>metric</th><th>base</th><th>edited</th><th>change</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def history_table(lab: Lab) -> str:
    quality = lab.quality
    head = ["step", "recipe", LABELS[quality], "KL to base", "size (MiB)", "latency (ms)", "latency vs base",
            "FLOPs vs base"]
    exits = any(p.exits is not None for p in lab.history)  # early exits: the compute they save
    head += ["compute saved by exits"] if exits else []
    body = []
    for p in lab.history:
        m = p.metrics
        change = p.latency if p.step else None  # the base has no change against itself
        cells = [p.step, p.label, getattr(m, quality), m.kl_to_base, m.size_bits / 8 / 2**20, m.latency_ms,
                 change.text() if change else None,
                 f"{change.predicted - 1:+.0%}" if change and change.predicted is not None else None]
        cells += [f"{p.exits.saved:.1%}" if p.exits else None] if exits else []
        names = ["", "", quality, "kl_to_base"]  # the rest are plain numbers or text
        body.append("<tr>" + "".join(f"<td>{_cell(c, n)}</td>" for c, n in zip(cells, names + [""] * len(cells)))
                    + "</tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(body) + "</tbody></table>")


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
          "text-align:left}th{background:#f3f3f3}pre{background:#f7f7f7;padding:1em;overflow-x:auto}")


def html_report(lab: Lab) -> str:
    """A self-contained HTML page: the recipe, the metrics table (base, edited, change),
    the history with its size and latency frontiers, and the per-layer figures. Plotly's
    JavaScript is inlined once (the report opens offline)."""
    quality = lab.quality
    figures = [(f"History: size vs {LABELS[quality]}",
                plots_lab.history_scatter(lab.history, "size_bits", quality, lab.frontier("size_bits"),
                                          lab.current.step)),
               (f"History: latency vs {LABELS[quality]}",
                plots_lab.history_scatter(lab.history, "latency_ms", quality, lab.frontier("latency_ms"),
                                          lab.current.step))]
    summary = lab.layer_summary()
    figures.append(("Sparsity per layer", plots_lab.sparsity_bars(summary)))
    if summary.heads_kept is not None:
        figures.append(("Attention heads kept per block", plots_lab.heads_bars(summary)))
    parts = []
    for i, (title, fig) in enumerate(figures):
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=i == 0))
    recipe = lab.recipe
    edits = "".join(f"<li>{html.escape(e.label)}</li>" for e in recipe.edits) or "<li>no edits (the base model)</li>"
    spec = html.escape(lab.base.spec)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>LayerScope report · {spec}</title>"
            f"<style>{_STYLE}</style></head><body>"
            f"<h1>Compression report · {spec}</h1>"
            f"<p>Base model fingerprint {html.escape(lab.base.fingerprint)}; evaluation set: "
            f"{html.escape(str(getattr(lab.batch, 'source', '')))}.</p>"
            f"<h2>Recipe</h2><ol>{edits}</ol><h2>Metrics</h2>{metrics_table(lab)}"
            f"<h2>History</h2>{history_table(lab)}<h2>Figures</h2>{''.join(parts)}"
            f"<h2>What the recipe changed</h2>{changed_html(lab)}"
            f"<h2>Recipe JSON</h2><pre>{html.escape(recipe.to_json())}</pre></body></html>")
