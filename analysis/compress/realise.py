"""Make an exported checkpoint folder as small as the edits allow, in forms plain
transformers loads. `ModelHandle.save_pretrained` writes the edited model densely (removed
parts as zeros, quantized weights as their float values); `realise_` then rewrites that
folder in place:

- removed blocks leave the config and the weights: the other blocks are renumbered, and
  every per-layer list of the config (`layer_types`, ...) keeps the kept layers' entries;
- quantized weights are stored quantized: compressed-tensors where it has the format
  (INT8, INT4, FP8 E4M3; `from_pretrained` dequantizes them as it loads), LayerScope's
  packed codes otherwise (`lib.packed` reads them).

What it could not realise is reported (`Realised`), for the model card to say.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.compress.quant.stored import (
    CT_FORMATS,
    Layout,
    ct_format,
    ct_scheme,
    ct_tensors,
    packed_tensors,
    parse_label,
)
from lib.handle import ModelHandle
from lib.packed import META_KEY, PACKED_FILE, WEIGHTS_FILE


@dataclass
class Realised:
    """What `realise_` did to a folder. dropped: original indices of the blocks taken out of
    config and weights; kept_zero: removed blocks left in as zeros, and why; stored: weight
    name (in the checkpoint) -> how it is stored ("int8 per-row, compressed-tensors");
    float: quantized weights kept in float, and why; notes: sentences for the model card."""

    n_layers: int = 0
    dropped: list[int] = field(default_factory=list)
    kept_zero: str = ""
    stored: dict[str, str] = field(default_factory=dict)
    float: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def compressed_tensors(self) -> bool:
        return any("compressed-tensors" in how for how in self.stored.values())

    @property
    def packed(self) -> bool:
        return any("LayerScope packed" in how for how in self.stored.values())


def block_list(plain: nn.Module, n_layers: int) -> str | None:
    """Path of the plain model's list of transformer blocks (`transformer.h`, `model.layers`)."""
    lists = [name for name, m in plain.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    return lists[0] if len(lists) == 1 else None


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name != PACKED_FILE:
            state.update(load_file(str(path)))
            path.unlink()
    index = folder / f"{WEIGHTS_FILE}.index.json"
    if index.exists():
        index.unlink()
    return state


def _param_names(edited: ModelHandle) -> dict[int, str]:
    """id(tensor) -> its name in the checkpoint (the plain model's state dict)."""
    return {id(t): name for name, t in edited.plain_model().named_parameters(remove_duplicate=False)}


# config.json settings that hold one entry per layer (transformers' `layer_types`; SmolLM3's `no_rope_layers`):
# other lists (token ids, shapes) are never cut, and lists of layer *indices* (`mlp_only_layers`) keep the zeros
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


def _drop_blocks(edited: ModelHandle, config: dict[str, Any], state: dict[str, torch.Tensor], done: Realised
                 ) -> dict[str, str]:
    """Take removed blocks out of `config` and `state` (in place); old key -> new key."""
    L = edited.structure.n_layers
    removed = sorted(int(p.split()[1]) for p in edited.structure.removed if p.startswith("block "))
    path = block_list(edited.plain_model(), L)
    if not removed:
        return {k: k for k in state}
    if config.get("scale_attn_by_inverse_layer_idx"):
        done.kept_zero = ("its attention is scaled by 1 / (layer index + 1), so renumbering the blocks would change "
                          "what the kept ones compute")
    elif path is None:
        done.kept_zero = "LayerScope did not find the model's list of blocks"
    elif unknown := [k for k, v in config.items() if k.endswith("_layers") and isinstance(v, list)
                     and k not in PER_LAYER_KEYS]:
        done.kept_zero = (f"its config lists layers by index ({', '.join(unknown)}), which LayerScope does not "
                          "renumber")
    if done.kept_zero:
        return {k: k for k in state}
    kept = [i for i in range(L) if i not in removed]
    new_index = {old: new for new, old in enumerate(kept)}
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.(.*)$")
    renamed: dict[str, str] = {}
    for key in list(state):
        match = pattern.match(key)
        if match is None:
            renamed[key] = key
            continue
        tensor = state.pop(key)
        old = int(match.group(1))
        if old in new_index:
            renamed[key] = f"{path}.{new_index[old]}.{match.group(2)}"
            state[renamed[key]] = tensor
    for key in PER_LAYER_KEYS:  # one setting per layer: the kept layers' stay, in order
        if isinstance(config.get(key), list) and len(config[key]) == L:
            config[key] = [config[key][i] for i in kept]
    from transformers import AutoConfig

    layers_key = AutoConfig.for_model(config["model_type"]).attribute_map.get("num_hidden_layers",
                                                                                "num_hidden_layers")
    config[layers_key] = len(kept)
    done.dropped, done.n_layers = removed, len(kept)
    return renamed


def _layouts(edited: ModelHandle, renamed: dict[str, str], state: dict[str, torch.Tensor]
             ) -> tuple[dict[str, Layout], dict[str, str]]:
    """Checkpoint key -> the stored layout of every quantized weight still in `state`;
    and key (or readable name) -> why a quantized weight cannot be stored quantized."""
    names, weights, plain = _param_names(edited), edited.weights(), edited.plain_model()
    layouts, why = {}, {}
    for readable, stored in edited.storage.items():
        if stored.removed or readable not in weights:
            continue
        key = renamed.get(names.get(id(weights[readable]), ""), None)
        if key is None or key not in state:
            continue
        module = plain.get_submodule(names[id(weights[readable])].rpartition(".")[0])
        transposed = type(module).__name__ == "Conv1D"
        cols = state[key].shape[0 if transposed else 1] if state[key].dim() == 2 else 0
        parsed = parse_label(stored.format, cols) if cols else None
        if parsed is None:
            why[key] = f"stored as {stored.format}, which is no single grid of codes and scales"
        else:
            layouts[key] = Layout(parsed[0], parsed[1], parsed[2], transposed)
    return layouts, why


def _quantize_state(edited: ModelHandle, renamed: dict[str, str], state: dict[str, torch.Tensor], done: Realised
                    ) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor], dict[str, Any]]:
    """Replace quantized weights in `state` by their stored forms. Returns the
    compressed-tensors quantization config (None if none is used), the packed tensors
    and the packed metadata."""
    try:
        import compressed_tensors  # noqa: F401
        have_ct = True
    except ImportError:
        have_ct = False
    layouts, done.float = _layouts(edited, renamed, state)
    groups: dict[str, dict[str, Any]] = {}
    packed: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    row_block = max((state[k].shape[0 if lay.transposed else 1] for k, lay in layouts.items()
                     if not lay.per_tensor and lay.group == state[k].shape[0 if lay.transposed else 1]), default=0)
    chosen = _one_scheme(layouts, state, row_block) if have_ct else None
    for key, layout in layouts.items():
        weight, module = state[key], key.rpartition(".")[0]
        where = "per-tensor" if layout.per_tensor else f"groups of {layout.group}"
        if have_ct and layout.fmt in CT_FORMATS:
            scheme = {"weights": ct_scheme(layout, tuple(weight.shape), row_block), "format": ct_format(layout)}
            tag = json.dumps(scheme, sort_keys=True)
            ct = ct_tensors(weight, layout, row_block) if tag == chosen else None
            if ct is None:  # plain transformers would misread it: it stays float
                done.float[key] = (f"its {layout.fmt} {where} grid is not the checkpoint's one compressed-tensors "
                                   f"scheme ({_version()} dequantizes every layer with the first scheme)"
                                   if tag != chosen else f"its {layout.fmt} values are not all on one grid")
                continue
            del state[key]
            state.update({f"{module}.{k}": v for k, v in ct.items()})
            groups.setdefault(tag, {**scheme, "targets": []})["targets"].append(f"re:^{re.escape(module)}$")
            done.stored[key] = f"{layout.fmt} ({where}), compressed-tensors {scheme['format']}"
            continue
        found = packed_tensors(weight, layout)
        if found is None:
            done.float[key] = f"its {layout.fmt} values are not all on one grid of codes and scales"
            continue
        tensors, info = found
        del state[key]
        packed.update({f"{key}.{k}": v for k, v in tensors.items()})
        meta[key] = info
        done.stored[key] = f"{layout.fmt} ({where}), LayerScope packed {info['bits']}-bit codes"
    config = None
    if groups:
        (group,) = groups.values()
        config = {"quant_method": "compressed-tensors", "format": group["format"],
                  "quantization_status": "compressed", "dequantize": True,
                  "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())}, "ignore": []}
    return config, packed, meta


def _version() -> str:
    import transformers

    return f"transformers {transformers.__version__}"


def _one_scheme(layouts: dict[str, Layout], state: dict[str, torch.Tensor], row_block: int) -> str | None:
    """The compressed-tensors scheme covering the most weights: transformers' loader
    dequantizes every dense layer with a checkpoint's first scheme, so a checkpoint holds
    one (layers on another grid, e.g. from a second Quantize step with its own group size, stay float)."""
    weight_count: dict[str, int] = {}
    for key, layout in layouts.items():
        if layout.fmt in CT_FORMATS:
            tag = json.dumps({"weights": ct_scheme(layout, tuple(state[key].shape), row_block),
                              "format": ct_format(layout)},
                             sort_keys=True)
            weight_count[tag] = weight_count.get(tag, 0) + state[key].numel()
    return max(weight_count, key=weight_count.get) if weight_count else None


def realise_(edited: ModelHandle, folder: str | Path) -> Realised:
    """Rewrite the checkpoint folder that `edited.save_pretrained(folder)` wrote: removed
    blocks out, quantized weights stored quantized (see the module's docstring)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    done = Realised(n_layers=edited.structure.n_layers)
    config = json.loads((folder / "config.json").read_text())
    state = _read_state(folder)
    renamed = _drop_blocks(edited, config, state, done)
    quant, packed, meta = _quantize_state(edited, renamed, state, done)
    if quant is not None:
        config["quantization_config"] = quant
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if packed:
        save_file(packed, str(folder / PACKED_FILE), metadata={"format": "pt", META_KEY: json.dumps(meta)})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return done
