"""Checks on a checkpoint folder before its model is built (see `lib.checkpoint` for
reading the files).

The model a config describes is built on the meta device (tensors with a shape and a
dtype but no memory, about 1 ms per layer), so its size is known before anything is
allocated, and its tensor names and shapes can be compared with the checkpoint's the
way `from_pretrained` matches them. A model that would not fit, weights that would
leave part of it random, and a tokenizer that cannot encode text are all refused
before the model is loaded.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lib.checkpoint import RESAVE, Shapes, first_line
from lib.errors import ModelTooLargeError, NoCheckpointError, UnsupportedModelError

DISK_MARGIN = 0.1  # a hub download leaves at least this share of the cache's free disk free
RAM_FRACTION = 0.8  # refuse a model whose float32 weights need more than this share of free RAM
MAX_META_LAYERS = 64  # above this many layers the size is extrapolated from 1- and 2-layer builds
# causal-mask constants old GPT-2-style checkpoints stored; no model of this version reads them
LEGACY_BUFFER = re.compile(r"(^|\.)masked_bias$")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",), ("vocab.txt",),
                   ("spiece.model",))
TOKENIZER_PROBE = "def f(x):\n    return x + 1\n"


# ---- memory ------------------------------------------------------------------------------------


def check_memory(spec: str, config_bytes: int, file_bytes: int, available_bytes: int | None,
                 dtype: torch.dtype = torch.float32) -> None:
    """Refuse when the larger of what the config builds and what the files hold (float32
    bytes, scaled to `dtype`, the precision it loads in) exceeds RAM_FRACTION of free
    memory (`available_bytes`, or measured now)."""
    import psutil

    scale = torch.empty((), dtype=dtype).element_size() / 4
    config_bytes, file_bytes = int(config_bytes * scale), int(file_bytes * scale)
    need = max(config_bytes, file_bytes)
    free = psutil.virtual_memory().available if available_bytes is None else available_bytes
    if need > RAM_FRACTION * free:
        raise ModelTooLargeError(
            f"{spec!r} needs about {need / 2**30:.2f} GiB as {str(dtype).replace('torch.', '')} (the model "
            "config.json describes takes "
            f"{_human(config_bytes)}; the weight files hold {_human(file_bytes)}), but only "
            f"{free / 2**30:.2f} GiB of memory is free (LayerScope uses at most {RAM_FRACTION:.0%} of it). "
            "Pick a smaller model.")


def check_download(spec: str, download_bytes: int, float32_bytes: int, available_bytes: int | None,
                   disk_free_bytes: int | None = None) -> None:
    """Refuse a hub download before it starts: when its files (`download_bytes`) or its weights as
    float32 (`float32_bytes`, 0 if the hub does not say) exceed RAM_FRACTION of free memory (it
    could not be loaded), or leave less than DISK_MARGIN of the cache's free disk free."""
    import psutil

    need = max(download_bytes, float32_bytes)
    free = psutil.virtual_memory().available if available_bytes is None else available_bytes
    if need > RAM_FRACTION * free:
        weights = f" (its weights take {_human(float32_bytes)} as float32)" if float32_bytes else ""
        raise ModelTooLargeError(
            f"{spec!r} is not downloaded: its files on the hub take {_human(download_bytes)}{weights}, but only "
            f"{free / 2**30:.2f} GiB of memory is free (LayerScope uses at most {RAM_FRACTION:.0%} of it), so it "
            "could not be loaded. Pick a smaller model.")
    if disk_free_bytes is not None and download_bytes > (1 - DISK_MARGIN) * disk_free_bytes:
        raise ModelTooLargeError(
            f"{spec!r} is not downloaded: its files on the hub take {_human(download_bytes)}, but the disk that "
            f"holds the Hugging Face cache has only {_human(disk_free_bytes)} free (a download may use at most "
            f"{1 - DISK_MARGIN:.0%} of it). Pick a smaller model.")


def _human(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes} bytes"


def model_bytes(model: nn.Module) -> int:
    """Bytes the model takes once loaded: distinct parameters as float32 (tied weights
    once) plus buffers at their own dtype. Works on meta-device models."""
    seen: set[int] = set()
    total = 0
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * 4
    for _, b in model.named_buffers(remove_duplicate=True):
        total += b.numel() * b.element_size()
    return total


# ---- transformers models on the meta device ----------------------------------------------------


def hf_config(folder: Path, config: dict, spec: str, trust_remote_code: bool) -> Any:
    """The transformers config of `folder`; one it cannot parse is refused naming config.json."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not model_type:
        raise UnsupportedModelError(
            f"{spec!r}: config.json has no \"model_type\" (such as \"gpt2\" or \"llama\"), so transformers "
            f"cannot tell which architecture it describes. {RESAVE}")
    if not isinstance(model_type, str):
        raise UnsupportedModelError(f"{spec!r}: config.json gives \"model_type\" as {str(model_type)[:40]}; it must "
                                    f"be one name in quotes, such as \"gpt2\" or \"llama\". {RESAVE}")
    if model_type not in CONFIG_MAPPING and not (trust_remote_code and config.get("auto_map")):
        raise UnsupportedModelError(f"{spec!r}: config.json names the model type {model_type!r}, which this "
                                    "version of transformers does not know.")
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure to parse a user's config is the user's to fix
        raise UnsupportedModelError(f"{spec!r}: transformers cannot read config.json as a {model_type} "
                                    f"config ({first_line(e)}).") from None


def hf_model_class(config: Any, spec: str) -> Any:
    """The transformers Auto class that TransformerLens' boot builds for `config`."""
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config
    from transformer_lens.model_bridge.sources.transformers.helpers import get_hf_model_class_for_architecture

    _no_installs()
    try:
        architecture = determine_architecture_from_hf_config(config)
        model_class = get_hf_model_class_for_architecture(architecture)
    except ValueError as e:
        raise UnsupportedModelError(f"{spec!r}: TransformerLens cannot tell which architecture config.json "
                                    f"describes ({first_line(e)}).") from None
    if model_class.__name__ != "AutoModelForCausalLM":  # images, audio, encoders: no views here read them
        raise UnsupportedModelError(f"{spec!r} is a {architecture} ({model_class.__name__.replace('AutoModelFor', '')}"
                                    " model); LayerScope reads text-only causal language models. Load one "
                                    "(e.g. gpt2, EleutherAI/pythia-160m, Qwen/Qwen2.5-0.5B).")
    return model_class


def _no_installs() -> None:
    """TransformerLens installs torchvision with pip when a multimodal model's processor
    needs it; a load never installs anything (multimodal models are refused anyway)."""
    from transformer_lens.model_bridge.sources.transformers import helpers

    helpers._ensure_torchvision = lambda: False


def meta_hf_model(model_class: Any, config: Any, spec: str, trust_remote_code: bool) -> nn.Module:
    """The model `config` describes, built on the meta device without initialising
    weights (about 1 ms per layer, no memory)."""
    from transformers.initialization import no_init_weights

    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    try:  # no_init_weights: the same switch from_pretrained sets while it builds a model
        with torch.device("meta"), no_init_weights():
            return model_class.from_config(config, **kwargs)
    except Exception as e:  # noqa: BLE001 - the config is user input; say what transformers said
        raise UnsupportedModelError(f"{spec!r}: config.json describes a model transformers cannot build "
                                    f"({type(e).__name__}: {first_line(e)}).") from None


@dataclass(frozen=True)
class ConfigSize:
    """What a transformers config builds, found without building a deep stack.

    bytes: memory the loaded model needs (see `model_bytes`).
    model: the meta model, or None for a stack deeper than MAX_META_LAYERS.
    n_layers: the config's layer count (None when it has no `num_hidden_layers`).
    layer_prefixes: for a deep stack, the name prefixes that a layer index follows
        (e.g. "transformer.h."), read off the difference between 1- and 2-layer builds.
    base_model_prefix: the name checkpoints of the bare base model leave off ("transformer").
    """

    bytes: int
    model: nn.Module | None
    n_layers: int | None = None
    layer_prefixes: tuple[str, ...] = ()
    base_model_prefix: str = ""


def hf_config_size(model_class: Any, config: Any, spec: str, trust_remote_code: bool) -> ConfigSize:
    """Size of the model `config` describes. A stack deeper than MAX_META_LAYERS is not
    built (about 1 ms and 35 kB of module objects per layer): its size is extrapolated
    from 1- and 2-layer builds, exact for a stack of equally sized layers."""
    n_layers = getattr(config, "num_hidden_layers", None)
    if isinstance(n_layers, int) and n_layers > MAX_META_LAYERS:
        try:
            one, two = (meta_hf_model(model_class, _with_layers(config, k), spec, trust_remote_code) for k in (1, 2))
        except UnsupportedModelError:
            one = two = None  # a config that only builds at its own depth: build it whole below
        if one is not None and two is not None:
            size = model_bytes(one) + (n_layers - 1) * (model_bytes(two) - model_bytes(one))
            prefixes = _layer_prefixes(one.state_dict().keys(), two.state_dict().keys())
            return ConfigSize(size, None, n_layers, prefixes, one.base_model_prefix)
    model = meta_hf_model(model_class, config, spec, trust_remote_code)
    return ConfigSize(model_bytes(model), model, n_layers)


def _layer_prefixes(one: Any, two: Any) -> tuple[str, ...]:
    """Prefixes before the layer index: a name the 2-layer model adds ("h.1.ln_1.weight")
    whose index component set to 0 names a tensor of the 1-layer model gives "h."."""
    prefixes = set()
    for name in set(two) - set(one):
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part == "1" and ".".join(parts[:i] + ["0"] + parts[i + 1:]) in one:
                prefixes.add(".".join(parts[:i]) + ".")
                break
    return tuple(sorted(prefixes))


def missing_layers(size: ConfigSize, names: Any, spec: str, weights: str) -> str | None:
    """For a deep stack that was not built: a message when the checkpoint `names` leave
    whole layers out (the config asks for more layers than the file holds), else None.
    The exact tensor-by-tensor check still follows on the built model."""
    if size.n_layers is None:
        return None
    for prefix in size.layer_prefixes:
        present = set()
        for name in names:
            for candidate in (name, f"{size.base_model_prefix}.{name}"):
                index = candidate[len(prefix):].split(".")[0] if candidate.startswith(prefix) else ""
                if index.isdigit():
                    present.add(int(index))
        absent = [i for i in range(size.n_layers) if i not in present]
        if absent:
            shown = ", ".join(f"{prefix}{i}.*" for i in absent[:3]) + (", ..." if len(absent) > 3 else "")
            return (f"{spec!r}: the weights in {weights} do not match the model config.json describes: it has "
                    f"{size.n_layers} layers, the file holds {_count(len(present), 'layer')}, so {len(absent)} "
                    f"layers are missing ({shown}). Loading would leave them random, so it is refused. Use the "
                    "config.json that was saved with these weights.")
    return None


def _with_layers(config: Any, n_layers: int) -> Any:
    small = copy.deepcopy(config)
    small.num_hidden_layers = n_layers
    layer_types = getattr(small, "layer_types", None)
    if isinstance(layer_types, list):  # per-layer lists must keep the stack's length
        small.layer_types = layer_types[:n_layers]
    return small


# ---- does the checkpoint match the config? -----------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    """How a checkpoint differs from the model its config builds.

    missing: names the model has and the checkpoint lacks (they would be random).
    unexpected: names the checkpoint has and the model does not use (they would be dropped).
    wrong_shape: (name, shape in the file, shape in the model).
    """

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    wrong_shape: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)

    def message(self, spec: str, weights: str, config: str) -> str:
        def names(keys: tuple[str, ...]) -> str:
            return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

        parts = []
        if self.missing:
            parts.append(f"{_count(len(self.missing), 'tensor')} the model needs "
                         f"{'is' if len(self.missing) == 1 else 'are'} missing ({names(self.missing)})")
        if self.unexpected:
            parts.append(f"{_count(len(self.unexpected), 'tensor')} in the file "
                         f"{'has' if len(self.unexpected) == 1 else 'have'} no place in the model "
                         f"({names(self.unexpected)})")
        if self.wrong_shape:
            shown = "; ".join(f"{n}: file {list(f)}, model {list(m)}" for n, f, m in self.wrong_shape[:3])
            more = "; ..." if len(self.wrong_shape) > 3 else ""
            parts.append(f"{_count(len(self.wrong_shape), 'tensor')} "
                         f"{'has' if len(self.wrong_shape) == 1 else 'have'} the wrong shape ({shown}{more})")
        harm = [what for what, found in (("leave parts of the model random", self.missing),
                                         ("drop tensors the file holds", self.unexpected),
                                         ("fail on tensors of the wrong shape", self.wrong_shape)) if found]
        return (f"{spec!r}: the weights in {weights} do not match the model {config} describes: "
                + "; ".join(parts) + f". Loading would {' and '.join(harm)}, so it is refused. "
                f"Use the {config} that was saved with these weights.")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def hf_mismatch(model: nn.Module, shapes: Shapes) -> Mismatch:
    """Compare checkpoint `shapes` with a (meta) transformers model the way
    `from_pretrained` matches them: its key renamings and base-model prefix, tied
    weights, and the model's own lists of keys to ignore."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    found, unexpected, wrong = set(), set(), []
    for key, shape in shapes.items():
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if name not in expected and key in expected:
            name, converted = key, None
        if name not in expected:
            unexpected.add(name)
            continue
        found.add(name)
        if converted is None and shape != expected[name]:  # converted tensors change shape on load
            wrong.append((key, shape, expected[name]))
    missing = set(expected) - found
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if source in found or target in found:  # one side of a tied pair fills both
            missing -= {target, source}
    # integer buffers (position ids, masks) are rebuilt by the module, never learned
    missing -= {name for name, b in model.named_buffers() if not b.is_floating_point()}
    unexpected = {name for name in unexpected if not LEGACY_BUFFER.search(name)}
    info = _KeySets(missing, unexpected)
    model._adjust_missing_and_unexpected_keys(info)  # the model's own ignore lists (legacy buffers, ...)
    return Mismatch(_sorted(info.missing_keys), _sorted(info.unexpected_keys), tuple(sorted(wrong)))


@dataclass
class _KeySets:
    missing_keys: set[str]
    unexpected_keys: set[str]


def plain_mismatch(model: nn.Module, shapes: Shapes) -> Mismatch:
    """Compare checkpoint `shapes` with `model.state_dict()` name by name (strict loading)."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    wrong = tuple(sorted((n, shapes[n], expected[n]) for n in expected.keys() & shapes.keys()
                         if shapes[n] != expected[n]))
    return Mismatch(_sorted(expected.keys() - shapes.keys()), _sorted(shapes.keys() - expected.keys()), wrong)


def _sorted(names: Any) -> tuple[str, ...]:
    """Names in reading order: h.2 before h.10."""
    return tuple(sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)]))


# ---- tokenizer ---------------------------------------------------------------------------------


def check_tokenizer(folder: Path, spec: str, trust_remote_code: bool) -> None:
    """Refuse a folder whose tokenizer cannot turn text into tokens and back.

    transformers builds an empty stand-in tokenizer for a GPT-2 folder without
    tokenizer files, which encodes every text to nothing; so the test is behaviour:
    a short ASCII text must give at least one token and decode back (up to
    whitespace), or, for word-level vocabularies that cannot spell code, a text made
    of the vocabulary's own first tokens must."""
    problem = _tokenizer_problem(folder, trust_remote_code)
    if problem is None:
        return
    present = [" + ".join(group) for group in TOKENIZER_FILES if all((folder / f).exists() for f in group)]
    present += [p.name for p in folder.glob("*.tiktoken")]
    fix = ("Save the tokenizer that belongs to these weights into the folder: tokenizer.save_pretrained(folder) "
           "(for a hub model, e.g. AutoTokenizer.from_pretrained(\"gpt2\").save_pretrained(folder)).")
    if not present:
        wanted = ", ".join(" + ".join(g) for g in TOKENIZER_FILES[:-1]) + " or " + TOKENIZER_FILES[-1][0]
        raise NoCheckpointError(f"{spec!r} has no tokenizer: the folder holds none of {wanted}, so text cannot "
                                f"be turned into tokens ({problem}). {fix}")
    raise NoCheckpointError(f"{spec!r} has tokenizer files ({', '.join(present)}) but they do not give a working "
                            f"tokenizer ({problem}). {fix}")


def _tokenizer_problem(folder: Path, trust_remote_code: bool) -> str | None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        ids = tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
        decoded = tokenizer.decode(ids)
    except Exception as e:  # noqa: BLE001 - a broken tokenizer folder is the user's to fix; say what failed
        return f"transformers cannot build or run one: {type(e).__name__}: {first_line(e)}"
    if not ids:
        return f"the tokenizer transformers builds turns {TOKENIZER_PROBE!r} into no tokens at all"
    if decoded.split() == TOKENIZER_PROBE.split() or _vocabulary_round_trips(tokenizer):
        return None
    return f"{TOKENIZER_PROBE!r} comes back from the tokenizer as {decoded!r}"


def _vocabulary_round_trips(tokenizer: Any) -> bool:
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(min(len(tokenizer), 64)) if i not in special][:8]
    if not ids:
        return False
    text = tokenizer.decode(ids)
    return bool(text.strip()) and tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
