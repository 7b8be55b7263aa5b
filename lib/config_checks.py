"""Checks on the settings in a language model's config.json that transformers accepts
but that would load a broken model or fail later in a way the user cannot read: sizes
that are not positive whole numbers (a GPT-2 with n_head -4 loads, and its card shows
-4 heads), a normalisation epsilon that makes every metric NaN, and an `architectures`
entry naming a class of another model family than `model_type`.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from typing import Any

from lib import checkpoint as ckpt
from lib.errors import NoCheckpointError, UnsupportedModelError

EPSILON_SETTINGS = ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps", "norm_eps", "layernorm_epsilon")
# counts and widths, under the names config.json files use (transformers' aliases included)
SIZE_SETTINGS = ("n_head", "n_layer", "n_embd", "n_positions", "n_ctx", "n_inner", "vocab_size", "hidden_size",
                 "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "intermediate_size",
                 "max_position_embeddings", "head_dim", "d_model", "n_heads", "n_layers", "num_layers",
                 "num_heads", "d_ff", "ffn_dim", "d_head", "d_mlp", "d_vocab")
# the same sizes as a parsed transformers config names them, whatever config.json called them
CONFIG_SIZES = ("num_attention_heads", "num_hidden_layers", "hidden_size", "vocab_size")


def check_listed_files(folder: Any, root: Any, spec: str) -> None:
    """Refuse file names that tokenizer_config.json lists for transformers to open
    ("fast_tokenizer_files") unless each is a regular file inside the folder: transformers
    joins them onto the folder unchecked, so "tokenizer.1.json/../../etc/passwd" was read."""
    path = folder / "tokenizer_config.json"
    if not path.exists():
        return
    try:
        listed = json.loads(ckpt.read_bounded(path, root, spec, ckpt.MAX_SIDE_FILE_BYTES)).get("fast_tokenizer_files")
    except (ValueError, AttributeError):
        return  # not a JSON object: the tokenizer load refuses it in words
    for name in listed if isinstance(listed, list) else [listed] if listed is not None else []:
        if not isinstance(name, str):
            raise NoCheckpointError(f"{spec!r}: tokenizer_config.json lists a tokenizer file that is not a name.")
        if not ckpt.names_inside(name) or os.path.lexists(folder / name):  # a missing one: transformers skips it
            ckpt.contained(folder, name, root, spec, "tokenizer_config.json")


def check_settings(config: dict, spec: str) -> None:
    """Refuse settings of config.json (the parsed JSON object) that no model can have."""
    for key in EPSILON_SETTINGS:
        value = config.get(key)
        if key in config and not (_is_number(value) and math.isfinite(value) and value >= 0):
            raise NoCheckpointError(f"{spec!r}: config.json sets {key} to {_shown(value)}; it must be a finite "
                                    "number >= 0 (usually 1e-5). Fix that setting in config.json.")
    for key in SIZE_SETTINGS:
        if config.get(key) is not None:  # null means "derive it" (GPT-2's n_inner, head_dim)
            _check_size(key, config[key], spec)
    _check_architectures(config, spec)


def check_sizes(hf_config: Any, spec: str) -> None:
    """The same rule on the sizes a parsed transformers config ends up with, whatever
    key config.json gave them under; the message names config.json's own key."""
    aliases = {canonical: key for key, canonical in getattr(hf_config, "attribute_map", {}).items()}
    for name in CONFIG_SIZES:
        value = getattr(hf_config, name, None)
        if value is not None:
            _check_size(aliases.get(name, name), value, spec)


def _check_size(key: str, value: object, spec: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedModelError(f"{spec!r}: config.json sets {key} to {_shown(value)}, but a count or size must "
                                    "be a whole number of at least 1. Fix that setting in config.json (use the "
                                    "config.json that was saved with these weights).")


def _check_architectures(config: dict, spec: str) -> None:
    """Refuse `architectures` naming a class transformers files under other model types
    only (e.g. LlamaForCausalLM with model_type "gpt2"): loading would build one family's
    model and read it through another family's names."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type, names = config.get("model_type"), config.get("architectures")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING or not isinstance(names, list):
        return  # a missing, odd or unknown model_type is refused where it is read; no list: nothing to compare
    owners = _class_owners()
    for name in names:
        if isinstance(name, str) and name in owners and model_type not in owners[name]:
            own = name.lower()  # the family the class is named after first: llama for LlamaForCausalLM
            ranked = sorted(owners[name], key=lambda t: (not own.startswith(t.replace("_", "").replace("-", "")), t))
            families = " or ".join(repr(t) for t in ranked[:3])
            raise UnsupportedModelError(
                f"{spec!r}: config.json says the model is of type {model_type!r} but lists the architecture "
                f"{name!r}, which belongs to model type {families}. Use the config.json that was saved with "
                f"these weights, or make \"architectures\" name a {model_type} class.")


@lru_cache(maxsize=1)
def _class_owners() -> dict[str, frozenset[str]]:
    """Model class name -> the model types transformers' Auto mappings file it under."""
    from transformers.models.auto import modeling_auto

    owners: dict[str, set[str]] = {}
    for attribute in dir(modeling_auto):
        mapping = getattr(modeling_auto, attribute)
        if not attribute.endswith("_MAPPING_NAMES") or not isinstance(mapping, dict):
            continue
        for model_type, classes in mapping.items():
            for name in classes if isinstance(classes, (list, tuple)) else (classes,):
                owners.setdefault(name, set()).add(model_type)
    return {name: frozenset(types) for name, types in owners.items()}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: object) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:40] + "..."
