"""Load a model from a zoo name, a local folder or a Hugging Face hub name.

    load_model("zoo:code-lm")          # bundled demo checkpoint
    load_model("/path/to/checkpoint")  # a folder with config.json + safetensors
    load_model("gpt2")                 # hub name: downloaded into the HF cache, then
                                       # loaded from there exactly like a local folder

Only safetensors are read unless `allow_pickle=True`; repository code is never run
unless `trust_remote_code=True`. Before anything is allocated (`lib.checkpoint` reads the
files, `lib.preflight` checks them), a
folder is refused in words when a file is broken, when the model its config builds or
the weights it holds would not fit in free memory (with the numbers), when the
weights do not match the config (no weight is ever left random), or when it has no
working tokenizer.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import torch

from lib import checkpoint as ckpt
from lib import preflight
from lib.checkpoint import save_image_model  # noqa: F401 - re-exported: callers save from lib.models
from lib.errors import (  # noqa: F401 - re-exported: callers catch these from lib.models
    HubUnavailableError,
    ModelLoadError,
    ModelNotFoundError,
    ModelTooLargeError,
    NoCheckpointError,
    PickleRefusedError,
    RemoteCodeRefusedError,
    UnsupportedModelError,
)
from lib.handle import ModelHandle
from lib.image_handle import TorchHandle
from lib.lm_handle import BridgeHandle
from lib.zoo import ZOO, ZOO_DIR

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def zoo_names() -> list[str]:
    return sorted(ZOO)


_LOADING = threading.Lock()  # one load at a time in a process: see load_model


def load_model(
    spec: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    available_bytes: int | None = None,
) -> ModelHandle:
    """Load `spec` (zoo name, local folder as a string or a `Path`, or hub name) into a `ModelHandle`.

    available_bytes: free memory to check against (default: measured now).
    Raises a `ModelLoadError` subclass with a user-facing message on bad input.

    Loads run one at a time: building on the meta device switches torch.nn.init off for
    the whole process (as transformers' `from_pretrained` does), and transformers' first
    import is not thread-safe, so two browser sessions loading at once broke each other
    and every later load.
    """
    with _LOADING:
        return _load(spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                     available_bytes=available_bytes)


def _load(spec: str | os.PathLike, *, allow_pickle: bool, trust_remote_code: bool,
          available_bytes: int | None) -> ModelHandle:
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if spec is not None and not isinstance(spec, str):
        raise ModelNotFoundError(f"A model is named by a string or a path, not by a {type(spec).__name__} value.")
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
    """Check everything that can be checked without allocating the model (files readable,
    size against free memory, checkpoint against config, tokenizer), then load it."""
    if not folder.is_dir():
        raise NoCheckpointError(f"{spec!r} is a file, not a folder. Give the folder that holds "
                                "config.json and the weights.")
    config_path = folder / "config.json"
    if not config_path.exists():
        raise NoCheckpointError(f"{spec!r} holds no config.json, so it is not a model checkpoint "
                                "folder. Give the folder that save_pretrained wrote.")
    config = ckpt.read_config(config_path, spec)
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
    headers = {f: ckpt.safetensors_shapes(f, spec) for f in weights}  # every header readable
    # float32 bytes the files hold: exact for safetensors, the file size for pickles
    file_bytes = sum(map(ckpt.shapes_bytes, headers.values())) or sum(p.stat().st_size for p in pickled)
    opts = dict(file_bytes=file_bytes, available_bytes=available_bytes)
    if "layerscope_architecture" in config:
        files = weights[:1] or pickled[:1]
        return _load_torch_image_model(files[0], headers.get(files[0]), spec, config, **opts)
    return _load_lm(folder, spec, config, headers, allow_pickle, trust_remote_code, **opts)


def _load_lm(folder: Path, spec: str, config: dict, headers: dict[Path, ckpt.Shapes], allow_pickle: bool,
             trust_remote_code: bool, *, file_bytes: int, available_bytes: int | None) -> BridgeHandle:
    hf_config = preflight.hf_config(folder, config, spec, trust_remote_code)
    model_class = preflight.hf_model_class(hf_config, spec)
    size = preflight.hf_config_size(model_class, hf_config, spec, trust_remote_code)
    preflight.check_memory(spec, size.bytes, file_bytes, available_bytes)
    files = ckpt.hf_weight_files(folder, spec, allow_pickle)
    shapes: ckpt.Shapes = {}
    for f in files:
        shapes.update(headers[f] if f in headers else ckpt.tensor_shapes(ckpt.load_pickled_state(f, spec)))
    if size.model is None:  # a deep stack: catch missing layers before building every one of them
        message = preflight.missing_layers(size, shapes, spec, _names(files))
        if message:
            raise NoCheckpointError(message)
    meta = size.model or preflight.meta_hf_model(model_class, hf_config, spec, trust_remote_code)
    mismatch = preflight.hf_mismatch(meta, shapes)
    if mismatch:
        raise NoCheckpointError(mismatch.message(spec, _names(files), "config.json"))
    preflight.check_tokenizer(folder, spec, trust_remote_code)
    return _load_bridge(folder, spec, trust_remote_code)


def _names(files: list[Path]) -> str:
    return files[0].name if len(files) == 1 else f"{files[0].name} ... {files[-1].name} ({len(files)} shards)"


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
    if bridge.tokenizer is None:  # checked before booting; an architecture may still skip it
        raise UnsupportedModelError(f"{spec!r} has no tokenizer files; save the tokenizer into the folder.")
    return BridgeHandle(spec, bridge)


def _load_torch_image_model(file: Path, header: ckpt.Shapes | None, spec: str, config: dict, *,
                            file_bytes: int, available_bytes: int | None) -> TorchHandle:
    """Build the zoo network on the meta device, check its size and the file's tensor
    names and shapes, then move the file's tensors in (no random weights ever exist)."""
    from lib.zoo.nets import ARCHITECTURES

    arch, kwargs = config["layerscope_architecture"], config.get("kwargs", {})
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{spec!r}: config.json names an unknown architecture {arch!r}; "
                                    f"known: {', '.join(sorted(ARCHITECTURES))}.")
    model = _meta_image_model(arch, kwargs, spec)
    removed = config.get("removed_stages", [])
    if not isinstance(removed, list) or any(name not in model.stages for name in removed):
        raise UnsupportedModelError(f"{spec!r}: \"removed_stages\" in config.json must list stages of {arch} "
                                    f"({', '.join(model.stages)}), not {removed!r}.")
    for name in removed:  # an exported copy with stages bypassed
        model.stages[name] = torch.nn.Identity()
    preflight.check_memory(spec, preflight.model_bytes(model), file_bytes, available_bytes)
    state = ckpt.load_safetensors(file, spec) if header is not None else ckpt.load_pickled_state(file, spec)
    mismatch = preflight.plain_mismatch(model, ckpt.tensor_shapes(state))
    if mismatch:
        raise NoCheckpointError(mismatch.message(spec, file.name, "config.json"))
    expected = model.state_dict()
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return TorchHandle(spec, model, ARCHITECTURES[arch][1], arch, kwargs)


def _meta_image_model(arch: str, kwargs: object, spec: str) -> torch.nn.Module:
    """The zoo network `arch` built from config.json's kwargs on the meta device."""
    import inspect

    from lib.zoo.nets import ARCHITECTURES, build

    takes = ", ".join(inspect.signature(ARCHITECTURES[arch][0]).parameters)
    if not isinstance(kwargs, dict):
        raise UnsupportedModelError(f"{spec!r}: \"kwargs\" in config.json must be an object of {arch} "
                                    f"arguments ({takes}), not {type(kwargs).__name__}.")
    try:
        with torch.device("meta"):
            return build(arch, **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UnsupportedModelError(f"{spec!r}: config.json gives {arch} arguments it cannot be built with "
                                    f"({e}); {arch} takes: {takes}.") from None
