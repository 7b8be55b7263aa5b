"""The edited model as a zipped checkpoint folder that is really compressed: removed
blocks gone, quantized weights stored quantized (`realise`), a README.md model card that
says per edit whether it is realised in storage, in compute or simulated only
(`model_card`), and the recipe. `export.py` re-exports these names.
"""

from __future__ import annotations

import io
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

from analysis.compress.edits import Edit
from analysis.compress.lab import Lab
from analysis.compress.model_card import write_card
from analysis.compress.quant.stored import CT_FORMATS
from analysis.compress.realise import Realised, realise_
from analysis.compress.recipe import Recipe
from lib.errors import CapabilityError
from lib.handle import ModelHandle
from lib.metrics import Metrics

NOTE_FILE = "LAYERSCOPE-NOTE.txt"
RECIPE_FILE = "layerscope-recipe.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 80


def safe_name(spec: str) -> str:
    """A file-name stem from a model spec: path separators and other characters become
    '_', '.' and '..' path parts vanish, no leading dot. `/tmp/x/../y` -> `tmp_x_y`,
    `zoo:code-lm` -> `zoo_code-lm`, `gpt2` -> `gpt2`; 'model' if nothing is left."""
    parts = [p for p in re.split(r"[/\\:]+", str(spec)) if p not in ("", ".", "..")]
    name = _UNSAFE.sub("_", "_".join(parts)).strip("._-")
    return name[:MAX_NAME].rstrip("._-") or "model"


def write_folder(edited: ModelHandle, folder: Path, recipe: Recipe | None = None,
                 measured: Metrics | None = None) -> Realised | None:
    """Write the edited model's checkpoint folder: weights and config as compact as plain
    transformers loads them (a language model; an image model is saved as it is), the
    recipe, the note (`export_note`) and README.md. Returns what was realised (None for an
    image model)."""
    if not hasattr(edited, "save_pretrained"):
        raise CapabilityError("This version of LayerScope cannot save models yet (ModelHandle.save_pretrained).")
    edited.save_pretrained(folder)
    done = realise_(edited, folder) if edited.kind == "causal-lm" else None
    note = export_note(edited)
    if note:
        (folder / NOTE_FILE).write_text(note + "\n")
    if recipe is not None:
        (folder / RECIPE_FILE).write_text(recipe.to_json() + "\n")
    write_card(folder, edited, recipe.edits if recipe is not None else (), done, measured,
               recipe.model if recipe is not None else edited.spec, note)
    return done


def model_zip(edited: ModelHandle, name: str, recipe: Recipe | None = None, measured: Metrics | None = None) -> bytes:
    """The edited model as a zip of one checkpoint folder `name/` (see `write_folder`):
    safetensors, config.json, tokenizer files, README.md, `layerscope-recipe.json` when a
    recipe is given and `LAYERSCOPE-NOTE.txt` when the folder leaves something out.
    Unzipped, a language model's folder loads with plain transformers (with
    compressed-tensors installed where weights are stored that way), or with
    `lib.packed.load_packed` where README.md says it holds LayerScope's packed codes."""
    name = safe_name(name)
    with tempfile.TemporaryDirectory(prefix="layerscope-export-") as tmp:
        folder = Path(tmp) / name
        write_folder(edited, folder, recipe, measured)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, str(path.relative_to(tmp)))
    return buffer.getvalue()


def _packed_formats(edited: ModelHandle) -> list[str]:
    """Formats of quantized weights that plain transformers has no reader for here (they are
    stored as LayerScope's packed codes)."""
    from analysis.compress.quant.formats import FORMATS

    try:
        import compressed_tensors  # noqa: F401
        readable = set(CT_FORMATS)
    except ImportError:
        readable = set()
    labels = [s.format.split() for s in edited.storage.values() if not s.removed]
    return sorted({parts[0] for parts in labels if len(parts) == 2 and parts[0] in FORMATS
                   and parts[0] not in readable})


def export_note(edited: ModelHandle) -> str:
    """What a checkpoint folder of `edited` leaves out or needs ('' if nothing): the inputs
    of linear layers that the edited model quantizes as it runs (activation quantization,
    LLM.int8) and an early-exit rule have no place in a standard config, so a folder loads
    without them; weights in formats plain transformers cannot read are stored as
    LayerScope's packed codes, which need `lib.packed.load_packed`."""
    notes = []
    layers = sorted(getattr(edited, "input_transforms", {}))
    if layers:
        notes.append(f"This checkpoint does not quantize activations. The edited model quantized the inputs of "
                     f"{len(layers)} linear layer(s) as it ran ({', '.join(layers)}); a checkpoint folder cannot say "
                     "so, so it loads with those inputs in full precision and its outputs differ from the lab's.")
    if getattr(edited, "exit_rule", None) is not None:
        notes.append("This checkpoint does not exit early. The edited model read each prediction out at the layer "
                     "where its exit rule fired; a checkpoint folder holds no exit rule (nor a tuned lens or exit "
                     "heads), so it loads running every layer and its outputs differ from the lab's.")
    packed = _packed_formats(edited) if edited.kind == "causal-lm" else []
    if packed:
        notes.append(f"Its {', '.join(packed)} weights are stored as LayerScope's packed codes + scales, which plain "
                     "transformers cannot read: load the folder with lib.packed.load_packed (README.md shows how).")
    if not notes:
        return ""
    return " ".join(notes) + " Apply the recipe in LayerScope to rebuild the model exactly."


def measured_for(lab: Lab, edits: Sequence[Edit]) -> Metrics | None:
    """The lab's metrics of the recipe `edits` (None if the lab has not measured it)."""
    edits = tuple(edits)
    return next((p.metrics for p in reversed(lab.history) if tuple(p.edits) == edits), None)


def lab_model_zip(lab: Lab, edits: Sequence[Edit] | None = None) -> bytes:
    """The lab's edited model for `edits` (default: the current recipe's), zipped with its
    recipe and the lab's metrics of it (see `model_zip`); named `<model>-<recipe digest or
    base>`. A page passes the edits it showed, so a download made later zips what was on screen."""
    edits = lab.current.edits if edits is None else tuple(edits)
    recipe = Recipe(lab.base.fingerprint, list(edits), model=lab.base.spec)
    name = f"{safe_name(lab.base.spec)}-{recipe.digest or 'base'}"
    return model_zip(lab.model_for(edits), name, recipe if edits else None, measured_for(lab, edits))
