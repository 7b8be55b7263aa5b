"""What leaves the compression lab: the edited model as a zipped checkpoint folder, the
recipe as JSON (and reading one back), the history as CSV, and a self-contained HTML
report. File names are made safe from whatever the model was called.
"""

from __future__ import annotations

import html
import io
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

from analysis.compress import plots as plots_lab
from analysis.compress.edits import Edit
from analysis.compress.lab import Lab
from analysis.compress.recipe import Recipe, check_for
from analysis.metric_text import metric_change, metric_value
from lib.errors import CapabilityError, RecipeError
from lib.handle import ModelHandle
from lib.metrics import LABELS

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 80


def safe_name(spec: str) -> str:
    """A file-name stem from a model spec: path separators and other characters become
    '_', '.' and '..' path parts vanish, no leading dot. `/tmp/x/../y` -> `tmp_x_y`,
    `zoo:code-lm` -> `zoo_code-lm`, `gpt2` -> `gpt2`; 'model' if nothing is left."""
    parts = [p for p in re.split(r"[/\\:]+", str(spec)) if p not in ("", ".", "..")]
    name = _UNSAFE.sub("_", "_".join(parts)).strip("._-")
    return name[:MAX_NAME].rstrip("._-") or "model"


def file_name(lab: Lab, what: str, suffix: str) -> str:
    """`<model>-<recipe digest or base>-<what>.<suffix>`, e.g. `zoo_code-lm-3f2a...-recipe.json`."""
    return f"{safe_name(lab.base.spec)}-{lab.current.digest or 'base'}-{what}.{suffix}"


# ---------------------------------------------------------------------- model


def model_zip(edited: ModelHandle, name: str, recipe: Recipe | None = None) -> bytes:
    """The edited model as a zip of one checkpoint folder `name/` (safetensors, config.json,
    tokenizer files, as `ModelHandle.save_pretrained` writes them), with the recipe that
    made it as `layerscope-recipe.json` when given, and `LAYERSCOPE-NOTE.txt` saying what the
    folder leaves out (`export_note`: activation quantization, early exits). Unzipped, the
    folder loads with `lib.models.load_model` (and, for language models, with plain
    transformers)."""
    if not hasattr(edited, "save_pretrained"):
        raise CapabilityError("This version of LayerScope cannot save models yet (ModelHandle.save_pretrained).")
    name = safe_name(name)
    with tempfile.TemporaryDirectory(prefix="layerscope-export-") as tmp:
        folder = Path(tmp) / name
        edited.save_pretrained(folder)
        note = export_note(edited)
        if note:
            (folder / NOTE_FILE).write_text(note + "\n")
        if recipe is not None:
            (folder / "layerscope-recipe.json").write_text(recipe.to_json() + "\n")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, str(path.relative_to(tmp)))
    return buffer.getvalue()


NOTE_FILE = "LAYERSCOPE-NOTE.txt"


def export_note(edited: ModelHandle) -> str:
    """What a checkpoint folder of `edited` leaves out ('' if nothing): the inputs of linear
    layers that the edited model quantizes as it runs (activation quantization, LLM.int8)
    and an early-exit rule (with its tuned lens or exit heads) have no place in a standard
    config, so a folder loads without them."""
    notes = []
    layers = sorted(getattr(edited, "input_transforms", {}))
    if layers:
        notes.append(f"This checkpoint does not quantize activations. The edited model quantized the inputs of "
                     f"{len(layers)} linear layer(s) as it ran ({', '.join(layers)}); a checkpoint folder cannot say "
                     "so, so it loads with those inputs in full precision and its outputs differ from the lab's. Its "
                     "quantized weights are written as their dequantized float values.")
    if getattr(edited, "exit_rule", None) is not None:
        notes.append("This checkpoint does not exit early. The edited model read each prediction out at the layer "
                     "where its exit rule fired; a checkpoint folder holds no exit rule (nor a tuned lens or exit "
                     "heads), so it loads running every layer and its outputs differ from the lab's.")
    if not notes:
        return ""
    return " ".join(notes) + " Apply the recipe in LayerScope to rebuild the model exactly."


def lab_model_zip(lab: Lab, edits: Sequence[Edit] | None = None) -> bytes:
    """The lab's edited model for `edits` (default: the current recipe's), zipped with its
    recipe (see `model_zip`); named `<model>-<recipe digest or base>`. A page passes the
    edits it showed, so a download made later zips what was on screen."""
    edits = lab.current.edits if edits is None else tuple(edits)
    recipe = Recipe(lab.base.fingerprint, list(edits), model=lab.base.spec)
    name = f"{safe_name(lab.base.spec)}-{recipe.digest or 'base'}"
    return model_zip(lab.model_for(edits), name, recipe if edits else None)


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
            f"<h2>Recipe JSON</h2><pre>{html.escape(recipe.to_json())}</pre></body></html>")
