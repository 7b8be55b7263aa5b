"""Measured, not assumed: write the lab's edited model as the export would, load that folder
back the way a user would (plain transformers; LayerScope's packed loader only where the
folder holds packed codes), and measure its size on disk, its metrics on the lab's batch
and its latency against the base's, timed in alternating pairs."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from analysis.compress.checkpoint_export import measured_for, safe_name, write_folder
from analysis.compress.edits import Edit
from analysis.compress.lab import Lab
from analysis.compress.recipe import Recipe
from analysis.metric_text import metric_value
from lib.latency import LATENCY_REPEATS, LatencyChange, compare_latency
from lib.metrics import LABELS, Metrics, metrics_from_outputs, model_inputs
from lib.packed import PACKED_FILE, load_packed
from lib.progress import Progress


@dataclass(frozen=True)
class ExportCheck:
    """The export of one recipe, loaded back. files_bytes: every file of the folder on disk;
    lab: the lab's metrics of the recipe (None if it has not measured it); base: the base's;
    reloaded: the metrics of the loaded folder on the lab's batch (size_bits: the files);
    latency: the loaded folder's forward against the base's plain forward; loader: how it
    was loaded; n_layers: the loaded config's blocks."""

    files_bytes: int
    lab: Metrics | None
    base: Metrics
    reloaded: Metrics
    latency: LatencyChange
    loader: str
    n_layers: int

    def rows(self, quality: str) -> dict[str, list[str]]:
        """A table for the page: size, `quality`, KL to base and latency of the base, the
        lab's edited model and the export loaded back."""
        def cells(m: Metrics | None, latency_ms: float | None) -> list[str]:
            if m is None:
                return ["–"] * 4
            value, kl = getattr(m, quality), m.kl_to_base
            return [f"{m.size_bits / 8 / 2**20:.2f} MiB", "–" if value is None else metric_value(quality, value),
                    "–" if kl is None else f"{kl:.4f}", "–" if latency_ms is None else f"{latency_ms:.1f}"]

        return {"": ["size", LABELS[quality], LABELS["kl_to_base"], "latency (ms)"],
                "base": cells(self.base, self.latency.base.median_ms),
                "lab (edited)": cells(self.lab, None if self.lab is None else self.lab.latency_ms),
                "export, loaded back": cells(self.reloaded, self.latency.model.median_ms)}

    def caption(self, quality: str) -> str:
        """What the table shows, in words built from its numbers."""
        parts = [f"The export was loaded back with {self.loader} ({self.n_layers} blocks); its files take "
                 f"{self.files_bytes / 2**20:.2f} MiB on disk"]
        if self.lab is not None:
            parts.append(f"{self.files_bytes * 8 / self.lab.size_bits:.2f}× the lab's size")
            got, want = getattr(self.reloaded, quality), getattr(self.lab, quality)
            if got is not None and want is not None:
                parts.append(f"its {LABELS[quality]} differs from the lab's by {abs(got - want):.2g}")
        parts.append(f"latency against the base, timed in alternating pairs: {self.latency.text()}")
        return "; ".join(parts) + ". The lab's latency column was timed through LayerScope, the other two through " \
                                  "plain transformers."


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@torch.no_grad()
def check_export(lab: Lab, edits: Sequence[Edit] | None = None, repeats: int = LATENCY_REPEATS,
                 progress: Progress | None = None) -> ExportCheck:
    """Export the lab's model for `edits` (default: the current recipe) to a temporary
    folder, load it back and measure it (see the module's docstring)."""
    report = progress or (lambda fraction, message: None)
    edits = lab.current.edits if edits is None else tuple(edits)
    recipe = Recipe(lab.base.fingerprint, list(edits), model=lab.base.spec)
    measured = measured_for(lab, edits)
    report(0.1, "Writing the export")
    with tempfile.TemporaryDirectory(prefix="layerscope-check-") as tmp:
        folder = Path(tmp) / f"{safe_name(lab.base.spec)}-{recipe.digest or 'base'}"
        write_folder(lab.model_for(edits), folder, recipe if edits else None, measured)
        files = folder_bytes(folder)
        report(0.4, "Loading the export back")
        loader = "LayerScope's packed loader" if (folder / PACKED_FILE).exists() else "plain transformers"
        model = load_packed(folder, dtype=lab.base.dtype)
    tokens = model_inputs(lab.batch)
    report(0.6, "Evaluating the loaded export")
    logits = model(input_ids=tokens.to(model.device)).logits
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    reloaded = metrics_from_outputs(logits, lab.batch, n_params, files * 8, lab.reference)
    report(0.8, "Timing it against the base")
    latency = compare_latency(lambda: lab.base.forward(tokens), lambda: model(input_ids=tokens.to(model.device)),
                              repeats=max(1, repeats))  # the base through its handle: under its lock
    reloaded = Metrics(**{**reloaded.__dict__, "latency_ms": latency.model.median_ms})
    return ExportCheck(files, measured, lab.base_point.metrics, reloaded, latency, loader,
                       int(model.config.num_hidden_layers))
