"""Load a model from a zoo name, a local folder or a Hugging Face hub name.

    load_model("zoo:code-lm")          # bundled demo checkpoint
    load_model("/path/to/checkpoint")  # a folder with config.json + safetensors
    load_model("gpt2")                 # hub name: downloaded into the HF cache, then
                                       # loaded from there exactly like a local folder

Only safetensors are read unless `allow_pickle=True`; repository code is never run
unless `trust_remote_code=True`; a model that would not fit in free memory is
refused before loading, with the numbers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lib.errors import (  # noqa: F401 - re-exported: callers catch these from lib.models
    HubUnavailableError, ModelLoadError, ModelNotFoundError, ModelTooLargeError, NoCheckpointError,
    PickleRefusedError, RemoteCodeRefusedError, UnsupportedModelError)
from lib.handle import BridgeHandle, ModelHandle, TorchHandle
from lib.zoo import ZOO, ZOO_DIR

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
RAM_FRACTION = 0.8  # refuse a model whose float32 weights need more than this share of free RAM
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def zoo_names() -> list[str]:
    return sorted(ZOO)


def load_model(
    spec: str,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    available_bytes: int | None = None,
) -> ModelHandle:
    """Load `spec` (zoo name, local folder or hub name) into a `ModelHandle`.

    available_bytes: free memory to check against (default: measured now).
    Raises a `ModelLoadError` subclass with a user-facing message on bad input.
    """
    spec = (spec or "").strip()
    if not spec:
        raise ModelNotFoundError("No model given. Pick a bundled model or type a hub name or folder.")
    opts = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                available_bytes=available_bytes)
    if spec.startswith("zoo:"):
        name = spec[4:]
        if name not in ZOO:
            raise ModelNotFoundError(f"There is no bundled model {name!r}. Bundled: "
                                     + ", ".join(f"zoo:{n}" for n in zoo_names()) + ".")
        folder = ZOO_DIR / name
        if not any(folder.glob("*.safetensors")):
            raise NoCheckpointError(f"The bundled model {spec} has no weights in {folder}. "
                                    f"Train it with `python -m lib.zoo.train {name}`.")
        return _load_folder(folder, spec, **opts)
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        if not path.exists():
            raise ModelNotFoundError(f"The folder {spec!r} does not exist. Check the path.")
        return _load_folder(path, spec, **opts)
    if not HUB_NAME.match(spec):
        raise ModelNotFoundError(
            f"{spec!r} is not a bundled model (zoo:...), an existing folder, or a Hugging Face "
            "hub name like 'gpt2' or 'EleutherAI/pythia-70m'.")
    return _load_folder(_download(spec, allow_pickle), spec, **opts)


def _download(name: str, allow_pickle: bool) -> Path:
    """Fetch a hub checkpoint into the local HF cache (or find it there when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = HUB_PATTERNS + ([f"*{s}" for s in PICKLE_SUFFIXES] if allow_pickle else [])
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(f"The Hugging Face hub has no model {name!r} (or it is private). "
                                 "Check the spelling, e.g. 'gpt2' or 'EleutherAI/pythia-70m'.") from e
    except (LocalEntryNotFoundError, OSError) as e:
        raise HubUnavailableError(
            f"Cannot load {name!r}: the Hugging Face hub is not reachable from this machine and "
            "the model is not in the local Hugging Face cache. Use a bundled model (zoo:...) or "
            "a local folder holding a checkpoint.") from e


def _load_folder(folder: Path, spec: str, *, allow_pickle: bool, trust_remote_code: bool,
                 available_bytes: int | None) -> ModelHandle:
    if not folder.is_dir():
        raise NoCheckpointError(f"{spec!r} is a file, not a folder. Give the folder that holds "
                                "config.json and the weights.")
    config_path = folder / "config.json"
    if not config_path.exists():
        raise NoCheckpointError(f"{spec!r} holds no config.json, so it is not a model checkpoint "
                                "folder. Give the folder that save_pretrained wrote.")
    config = json.loads(config_path.read_text())
    weights = sorted(folder.glob("*.safetensors"))
    pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not weights:
        if pickled and not allow_pickle:
            raise PickleRefusedError(
                f"{spec!r} has only pickled weights ({', '.join(p.name for p in pickled)}). "
                "Pickle files can run code when loaded, so they are refused by default. If you "
                "trust the source, load with allow_pickle=True (read with torch.load(weights_only=True)).")
        if not pickled:
            raise NoCheckpointError(f"{spec!r} has a config.json but no weights (*.safetensors).")
    if config.get("auto_map") and not trust_remote_code:
        raise RemoteCodeRefusedError(
            f"{spec!r} needs its own Python code to load (auto_map in config.json). Remote code "
            "is refused by default; load with trust_remote_code=True only if you trust it.")
    _check_memory(spec, weights or pickled, available_bytes)
    if "layerscope_architecture" in config:
        return _load_torch_image_model(folder, spec, config, weights, pickled)
    return _load_bridge(folder, spec, trust_remote_code)


def _count_params(files: list[Path]) -> int:
    """Parameter count from safetensors headers (no tensor data read), or file bytes / 4."""
    from safetensors import safe_open

    total = 0
    for f in files:
        if f.suffix != ".safetensors":
            total += f.stat().st_size // 4
            continue
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                total += _prod(sf.get_slice(key).get_shape())
    return total


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _check_memory(spec: str, files: list[Path], available_bytes: int | None) -> None:
    import psutil

    need = _count_params(files) * 4  # loaded as float32
    free = psutil.virtual_memory().available if available_bytes is None else available_bytes
    if need > RAM_FRACTION * free:
        raise ModelTooLargeError(
            f"{spec!r} needs about {need / 2**30:.2f} GiB as float32, but only {free / 2**30:.2f} GiB "
            f"of memory is free (LayerScope uses at most {RAM_FRACTION:.0%} of it). Pick a smaller model.")


def _load_bridge(folder: Path, spec: str, trust_remote_code: bool) -> BridgeHandle:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(
            str(folder), device="cpu", trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise UnsupportedModelError(f"{spec!r} could not be loaded as a TransformerLens model: {e}") from e
    bridge.eval()
    for p in bridge.original_model.parameters():
        p.requires_grad_(False)  # a base model is read-only; analyses never need its grads
    if bridge.tokenizer is None:
        raise UnsupportedModelError(f"{spec!r} has no tokenizer files; save the tokenizer into the folder.")
    return BridgeHandle(spec, bridge)


def _load_torch_image_model(folder: Path, spec: str, config: dict, weights: list[Path],
                            pickled: list[Path]) -> TorchHandle:
    from safetensors.torch import load_file

    from lib.zoo.nets import ARCHITECTURES, build

    arch = config["layerscope_architecture"]
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{spec!r} names an unknown architecture {arch!r}; "
                                    f"known: {', '.join(sorted(ARCHITECTURES))}.")
    model = build(arch, **config.get("kwargs", {}))
    state = load_file(str(weights[0])) if weights else torch.load(pickled[0], weights_only=True)
    model.load_state_dict(state)
    for p in model.parameters():
        p.requires_grad_(False)
    return TorchHandle(spec, model, ARCHITECTURES[arch][1], arch)


def save_image_model(model: torch.nn.Module, architecture: str, folder: Path, **kwargs) -> None:
    """Write an image model as safetensors + config.json (loadable by `load_model`)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"layerscope_architecture": architecture, "kwargs": kwargs}, indent=2) + "\n")
