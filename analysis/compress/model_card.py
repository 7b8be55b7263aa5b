"""The README.md of an exported model: the recipe, and for each edit whether the folder
realises it in storage, in compute, or only simulates it (same outputs, no saving); the
metrics the lab measured; the files' size on disk; how to load it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from analysis.compress.edits import Edit
from analysis.compress.realise import Realised
from analysis.metric_text import metric_value
from lib.handle import ModelHandle
from lib.metrics import LABELS, METRIC_FIELDS, Metrics
from lib.packed import PACKED_FILE

CARD_FILE = "README.md"
SIMULATED = "simulated only"


def sparsity(edited: ModelHandle) -> float | None:
    """Share of exactly-zero weights in the blocks' linear layers (None for none)."""
    weights = [w for name, w in edited.linear_layers().items() if name.startswith("blocks.")]
    total = sum(w.numel() for w in weights)
    return sum(w.numel() - int(w.count_nonzero()) for w in weights) / total if total else None


def _quantized(edit: Edit, done: Realised | None) -> tuple[str, str]:
    fmt = getattr(edit, "format", "")
    stored = [how for how in (done.stored.values() if done else ()) if how.startswith(f"{fmt} ")]
    kept = len(done.float) if done else 0
    activations = " Its activation quantization is simulated only: see the note." if edit.activations else ""
    if not stored:
        return SIMULATED, (f"No weight could be stored in {fmt}; they are written as their dequantized float values."
                           + activations)
    forms = sorted({how.split(", ", 1)[1] for how in stored})
    extra = f" {kept} quantized weight(s) stay in float (see below)." if kept else ""
    return "storage", (f"{len(stored)} weight(s) stored as {fmt} codes + scales ({'; '.join(forms)}); they are "
                       f"dequantized to float when loaded, so compute is in float.{extra}{activations}")


def edit_status(edit: Edit, edited: ModelHandle, done: Realised | None) -> tuple[str, str]:
    """(where the edit is realised: "storage and compute", "storage", SIMULATED or "not in
    the checkpoint"; a sentence saying how) for one recipe edit."""
    kind = edit.type
    model_type = getattr(getattr(edited.plain_model(), "config", None), "model_type", "this") \
        if edited.kind == "causal-lm" else "this"
    if kind in ("drop", "skip_layers") and getattr(edit, "kind", "block") == "block":
        if done and done.dropped:
            return "storage and compute", (f"The removed block(s) are gone from the config and the weights (the "
                                           f"model has {done.n_layers} layers; the rest are renumbered).")
        why = done.kept_zero if done and done.kept_zero else "this kind of model is saved whole"
        return SIMULATED, f"Removed blocks are written as zeros in their original shapes: {why}."
    if kind == "drop" and edit.kind == "stage":
        return "storage and compute", "The stage is bypassed in the saved model."
    if kind == "drop":
        return SIMULATED, (f"Plain transformers has no per-layer switch to leave out a {edit.kind} sublayer of a "
                           f"{model_type} model, so its weights are written as zeros in their original shapes: same "
                           "outputs, same size and compute as before. LayerScope's lab runs without it.")
    if kind == "remove_heads":
        return SIMULATED, (f"Plain transformers ({_version()}) has neither GPT-2's old `pruned_heads` nor per-layer "
                           f"head counts for {model_type} models, so the removed heads' rows and columns are written "
                           "as zeros: same outputs, same size and compute. LayerScope's lab computes the smaller "
                           "layer.")
    if kind in ("magnitude", "wanda", "layer_sparsity"):
        share = sparsity(edited)
        said = f"{share:.1%} of the blocks' linear weights are zero" if share is not None else "zeros"
        return SIMULATED, (f"Pruned weights are stored densely ({said}); no sparse format loads in plain transformers "
                           "on CPU. The zip's compression shrinks the download, not the unzipped files.")
    if kind == "quantize":
        return _quantized(edit, done)
    if kind == "llm_int8":
        return SIMULATED, ("LLM.int8's int8 weights with 16-bit outlier columns are written as their float values, "
                           "and inputs are not quantized when loaded.")
    if kind == "low_rank":
        return SIMULATED, ("Plain transformers has no factorised linear layer, so each factorised weight is written "
                           "as the dense product B·A: same outputs, full size and compute.")
    if kind == "share_layers":
        return SIMULATED, "A checkpoint stores shared weights once per block: same outputs, full size."
    if kind == "early_exit":
        return "not in the checkpoint", "A checkpoint holds no exit rule: the model runs every layer when loaded."
    return SIMULATED, "Written as the edited weights in the original shapes."


def _version() -> str:
    import transformers

    return f"transformers {transformers.__version__}"


def _size(nbytes: float) -> str:
    return f"{nbytes:,.0f} bytes ({nbytes / 2**20:.2f} MiB)"


def _metrics_rows(metrics: Metrics) -> list[str]:
    rows = []
    for name in METRIC_FIELDS:
        value = getattr(metrics, name)
        if value is None:
            continue
        shown = (_size(value / 8) if name == "size_bits" else f"{value:,}" if isinstance(value, int)
                 else f"{value:.1f}" if name == "latency_ms" else metric_value(name, value))
        rows.append(f"| {LABELS[name]} | {shown} |")
    return rows


def how_to_load(folder_name: str, done: Realised | None) -> str:
    if done is not None and done.packed:
        return (f"Some weights are in LayerScope's packed form (`{PACKED_FILE}`), which plain transformers cannot "
                "read. Load the folder with LayerScope:\n\n```python\nfrom lib.packed import load_packed\n"
                f"model = load_packed(\"{folder_name}\")  # a transformers model, weights in float\n```\n\n"
                "or write a plain float copy first with `lib.packed.unpack_folder(folder, into)`.")
    needs = (" Its quantized weights are in the compressed-tensors format: `pip install compressed-tensors` first "
             "(transformers dequantizes them to float as it loads).") if done is not None and \
        done.compressed_tensors else ""
    return ("Plain transformers loads the folder, no LayerScope needed:\n\n```python\n"
            "from transformers import AutoModelForCausalLM\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{folder_name}\")\n```\n" + needs)


def write_card(folder: Path, edited: ModelHandle, edits: Sequence[Edit], done: Realised | None,
               measured: Metrics | None = None, model: str = "", note: str = "") -> str:
    """Write README.md into `folder` (after every other file is there) and return its text."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    lines = [f"# {folder.name}", "", f"Exported by LayerScope from `{model or 'the base model'}`"
             f" (base fingerprint `{edited.base_fingerprint or edited.fingerprint}`).", "", "## Recipe", ""]
    if edits:
        lines += ["| # | edit | realised in | how |", "| --- | --- | --- | --- |"]
        for i, edit in enumerate(edits, 1):
            where, how = edit_status(edit, edited, done)
            lines.append(f"| {i} | {edit.label} | {where} | {how} |")
    else:
        lines.append("No edits: this is the base model.")
    if done is not None and done.float:
        lines += ["", "Quantized weights kept in float:", ""]
        lines += [f"- `{k}`: {why}" for k, why in sorted(done.float.items())]
    lines += ["", "## Metrics measured by the lab", ""]
    if measured is not None:
        lines += ["| metric | value |", "| --- | --- |"] + _metrics_rows(measured)
        lines += ["", "The lab's size counts the weights as it stores them (codes, scales and zero points; removed "
                  "parts as nothing), not the files."]
    else:
        lines.append("Not measured: the model was exported outside the lab.")
    lines += ["", "## Files on disk", "", "| file | bytes |", "| --- | --- |"]
    lines += [f"| {name} | {size:,} |" for name, size in files.items()]
    lines += ["", f"Total without this card: {_size(sum(files.values()))}.", "", "## Loading", "",
              how_to_load(folder.name, done)]
    if note:
        lines += ["", "## What the folder leaves out", "", note]
    text = "\n".join(lines) + "\n"
    (folder / CARD_FILE).write_text(text)
    return text
