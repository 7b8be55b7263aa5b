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
working tokenizer. Every file a load reads is a regular file inside the folder (links
resolved; see `lib.checkpoint.check_folder`), and a hub repository whose files would
not fit is refused before anything is downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch

from lib import checkpoint as ckpt
from lib import config_checks, devices, preflight
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


# Two locks (see load_model): one per model being loaded, held for the whole load, and one
# for the whole process, held only while transformers or torch state shared by every thread
# is in use (building models, transformers' lazy imports), never while a file is downloaded.
_SPEC_LOCKS: dict[str, tuple[threading.Lock, list[int]]] = {}  # key -> (lock, [threads using it])
_SPEC_LOCKS_GUARD = threading.Lock()
_PROCESS_STATE = threading.Lock()


def load_model(
    spec: str | os.PathLike,
    *,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    available_bytes: int | None = None,
) -> ModelHandle:
    """Load `spec` (zoo name, local folder as a string or a `Path`, or hub name) into a `ModelHandle`.

    device: "auto" (CUDA, then Apple MPS, then the CPU), "cpu", "cuda" or "mps"; dtype:
    "auto" (the checkpoint's own: bfloat16 stays bfloat16), "float32", "bfloat16" or
    "float16" (`lib.devices`). available_bytes: free memory to check against (default: measured now).
    Raises a `ModelLoadError` subclass with a user-facing message on bad input.

    Loads of one model run one at a time (a lock per resolved spec, so two sessions
    asking for it do not download or build it twice); loads of different models run
    side by side, except where they use process-wide state: building on the meta device
    switches torch.nn.init off for the whole process (as transformers' `from_pretrained`
    does, which also sets torch's default dtype), and transformers' lazy imports are not
    thread-safe, so two sessions building at once broke each other and every later load.
    Those steps hold `_PROCESS_STATE`; downloads and file reads never do, so a slow or
    stuck load of one model does not hold up the others.
    """
    with _spec_lock(_lock_key(spec)):
        return _load(spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                     available_bytes=available_bytes, device=device, dtype=dtype)


def _lock_key(spec: object) -> str:
    """What a load is of: the resolved folder for an existing path, else the spec itself."""
    text = (os.fspath(spec) if isinstance(spec, os.PathLike) else spec) if spec is not None else ""
    if not isinstance(text, str):
        return ""
    text = text.strip()
    if text.startswith("zoo:"):
        return text
    try:
        path = Path(text).expanduser()
        return str(path.resolve()) if text and path.exists() else text
    except (OSError, RuntimeError, ValueError):
        return text


@contextmanager
def _spec_lock(key: str) -> Iterator[None]:
    """Hold the lock of `key`; it is forgotten once no thread holds or waits for it, so
    the table does not grow with every name a visitor types."""
    with _SPEC_LOCKS_GUARD:
        lock, users = _SPEC_LOCKS.setdefault(key, (threading.Lock(), [0]))
        users[0] += 1
    try:
        with lock:
            yield
    finally:
        with _SPEC_LOCKS_GUARD:
            users[0] -= 1
            if not users[0]:
                del _SPEC_LOCKS[key]


def _load(spec: str | os.PathLike, *, allow_pickle: bool, trust_remote_code: bool,
          available_bytes: int | None, device: str, dtype: str) -> ModelHandle:
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if spec is not None and not isinstance(spec, str):
        raise ModelNotFoundError(f"A model is named by a string or a path, not by a {type(spec).__name__} value.")
    spec = (spec or "").strip()
    if not spec:
        raise ModelNotFoundError("No model given. Pick a bundled model or type a hub name or folder.")
    devices.pick_device(device), devices.pick_dtype(dtype, {})  # a name this machine lacks: refused first
    opts = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                available_bytes=available_bytes, device=device, dtype=dtype)
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
    revision = _check_hub_size(spec, allow_pickle, available_bytes)
    pinned = {"revision": revision} if revision else {}  # download exactly what was measured
    return _load_folder(_download(spec, allow_pickle, **pinned), spec, **opts)


def _hub_patterns(allow_pickle: bool) -> list[str]:
    return HUB_PATTERNS + ([f"*{s}" for s in PICKLE_SUFFIXES] if allow_pickle else [])


def _check_hub_size(name: str, allow_pickle: bool, available_bytes: int | None) -> str | None:
    """Refuse a hub repository whose files (those `_download` would fetch) would not fit
    in memory or on the cache's disk, before anything is downloaded; the commit measured
    (None when the hub could not be asked: offline, the cache alone is used)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        info = HfApi().model_info(name, files_metadata=True, timeout=10)
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(f"The Hugging Face hub has no model {name!r} (or it is private). "
                                 "Check the spelling, e.g. 'gpt2' or 'EleutherAI/pythia-70m'.") from e
    except Exception:  # noqa: BLE001 - hub unreachable or odd: the download then finds the cache or says so
        return None
    files = list(filter_repo_objects(info.siblings or [], allow_patterns=_hub_patterns(allow_pickle),
                                     key=lambda f: f.rfilename))
    download = sum(f.size or 0 for f in files)
    parameters = getattr(getattr(info, "safetensors", None), "total", None) or 0
    preflight.check_download(name, download, 4 * parameters, available_bytes, _cache_disk_free())
    return info.sha


def _cache_disk_free() -> int | None:
    """Free bytes on the disk that holds the Hugging Face cache (None if it cannot be told)."""
    from huggingface_hub import constants

    path = Path(constants.HF_HUB_CACHE)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _download(name: str, allow_pickle: bool, revision: str | None = None) -> Path:
    """Fetch a hub checkpoint into the local HF cache (or find it there when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=_hub_patterns(allow_pickle)))
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(f"The Hugging Face hub has no model {name!r} (or it is private). "
                                 "Check the spelling, e.g. 'gpt2' or 'EleutherAI/pythia-70m'.") from e
    except (LocalEntryNotFoundError, OSError) as e:
        raise HubUnavailableError(
            f"Cannot load {name!r}: the Hugging Face hub is not reachable from this machine and "
            "the model is not in the local Hugging Face cache. Use a bundled model (zoo:...) or "
            "a local folder holding a checkpoint.") from e


def _load_folder(folder: Path, spec: str, *, allow_pickle: bool, trust_remote_code: bool,
                 available_bytes: int | None, device: str, dtype: str) -> ModelHandle:
    """Check everything that can be checked without allocating the model (files readable,
    regular and inside the folder, size against free memory, checkpoint against config,
    tokenizer), then load it."""
    if not folder.is_dir():
        raise NoCheckpointError(f"{spec!r} is a file, not a folder. Give the folder that holds "
                                "config.json and the weights.")
    folder = folder.resolve()
    config_path = folder / "config.json"
    if not os.path.lexists(config_path):
        raise NoCheckpointError(f"{spec!r} holds no config.json, so it is not a model checkpoint "
                                "folder. Give the folder that save_pretrained wrote.")
    root = _containing_root(folder)
    ckpt.check_folder(folder, root, spec)  # nothing below opens a pipe, a device or a file elsewhere
    config_checks.check_listed_files(folder, root, spec)
    config = ckpt.read_config(config_path, spec, root)
    weights = sorted(folder.glob("*.safetensors"))
    pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not weights:
        if pickled and not allow_pickle:
            raise PickleRefusedError(
                f"{spec!r} has only pickled weights ({', '.join(p.name for p in pickled)}). "
                "Pickle files can run code when loaded, so they are refused by default (when allowed, they are "
                "read with torch.load(weights_only=True)). If you trust the source, load with allow_pickle=True.")
        if not pickled:
            raise NoCheckpointError(f"{spec!r} has a config.json but no weights (*.safetensors).")
    if config.get("auto_map") and not trust_remote_code:
        raise RemoteCodeRefusedError(
            f"{spec!r} needs its own Python code to load (auto_map in config.json). Remote code "
            "is refused by default. If you trust the source, load with trust_remote_code=True.")
    headers = {f: ckpt.safetensors_shapes(f, spec, root) for f in weights}  # every header readable
    # float32 bytes the files hold: exact for safetensors, the file size for pickles
    file_bytes = sum(map(ckpt.shapes_bytes, headers.values())) or sum(p.stat().st_size for p in pickled)
    opts = dict(file_bytes=file_bytes, available_bytes=available_bytes, device=device, dtype=dtype)
    if "layerscope_architecture" in config:
        files = weights[:1] or pickled[:1]
        return _load_torch_image_model(files[0], headers.get(files[0]), spec, config, root=root, **opts)
    return _load_lm(folder, spec, config, headers, allow_pickle, trust_remote_code, root=root, **opts)


def _containing_root(folder: Path) -> Path:
    """The folder that every file of resolved `folder` must lie in: the folder itself, or
    for a Hugging Face cache snapshot (models--org--name/snapshots/<commit>), whose files
    are links into models--org--name/blobs, the repository's cache folder."""
    repo = folder.parent.parent
    if folder.parent.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
        return repo
    return folder


def _load_lm(folder: Path, spec: str, config: dict, headers: dict[Path, ckpt.Shapes], allow_pickle: bool,
             trust_remote_code: bool, *, root: Path, file_bytes: int, available_bytes: int | None, device: str,
             dtype: str) -> BridgeHandle:
    config_checks.check_settings(config, spec)
    with _PROCESS_STATE:  # transformers' config classes: lazy imports; meta builds switch torch.nn.init off
        hf_config = preflight.hf_config(folder, config, spec, trust_remote_code)
        config_checks.check_sizes(hf_config, spec)
        model_class = preflight.hf_model_class(hf_config, spec)
        size = preflight.hf_config_size(model_class, hf_config, spec, trust_remote_code)
    precision = devices.pick_dtype(dtype, config)
    where = devices.placement(device, dtype, config, size.bytes * devices.itemsize(precision) // 4)
    preflight.check_memory(spec, size.bytes, file_bytes, available_bytes, where.dtype)
    files = ckpt.hf_weight_files(folder, spec, allow_pickle, root)
    shapes: ckpt.Shapes = {}
    for f in files:
        shapes.update(headers[f] if f in headers else ckpt.tensor_shapes(ckpt.load_pickled_state(f, spec, root)))
    if size.model is None:  # a deep stack: catch missing layers before building every one of them
        message = preflight.missing_layers(size, shapes, spec, _names(files))
        if message:
            raise NoCheckpointError(message)
    with _PROCESS_STATE:
        meta = size.model or preflight.meta_hf_model(model_class, hf_config, spec, trust_remote_code)
        mismatch = preflight.hf_mismatch(meta, shapes)
        if mismatch:
            raise NoCheckpointError(mismatch.message(spec, _names(files), "config.json"))
        preflight.check_tokenizer(folder, spec, trust_remote_code)
        handle = _load_bridge(folder, spec, trust_remote_code, where)
    bridged = "._original_component"  # TransformerBridge's wrapper in every path: the checkpoint's names lack it
    _check_finite(((n.replace(bridged, ""), p) for n, p in handle.model.original_model.named_parameters()), spec)
    return handle


def _check_finite(tensors: Iterable[tuple[str, torch.Tensor]], spec: str) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor: they would load and give
    NaN metrics (or a classifier's chance accuracy) with no word of why."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NoCheckpointError(f"{spec!r}: the weight {name} holds NaN or infinite values, so every result "
                                    "computed with it would be meaningless. Load a checkpoint saved before the "
                                    "values went bad, or retrain the model.")


def _names(files: list[Path]) -> str:
    return files[0].name if len(files) == 1 else f"{files[0].name} ... {files[-1].name} ({len(files)} shards)"


def _load_bridge(folder: Path, spec: str, trust_remote_code: bool, where: devices.Placement) -> BridgeHandle:
    from transformer_lens.model_bridge import TransformerBridge

    spread = {"device_map": where.device_map} if where.device_map else {"device": where.device}
    try:
        bridge = TransformerBridge.boot_transformers(
            str(folder), dtype=where.dtype, trust_remote_code=trust_remote_code, **spread)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise UnsupportedModelError(f"{spec!r} could not be loaded as a TransformerLens model: {e}") from e
    bridge.eval()
    for p in bridge.original_model.parameters():
        p.requires_grad_(False)  # a base model is read-only; analyses never need its grads
    if bridge.tokenizer is None:  # checked before booting; an architecture may still skip it
        raise UnsupportedModelError(f"{spec!r} has no tokenizer files; save the tokenizer into the folder.")
    return BridgeHandle(spec, bridge)


def _load_torch_image_model(file: Path, header: ckpt.Shapes | None, spec: str, config: dict, *, root: Path,
                            file_bytes: int, available_bytes: int | None, device: str, dtype: str) -> TorchHandle:
    """Build the zoo network on the meta device, check its size and the file's tensor
    names and shapes, then move the file's tensors in (no random weights ever exist)."""
    from lib.zoo.nets import ARCHITECTURES

    arch, kwargs = config["layerscope_architecture"], config.get("kwargs", {})
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{spec!r}: config.json names an unknown architecture {arch!r}; "
                                    f"known: {', '.join(sorted(ARCHITECTURES))}.")
    with _PROCESS_STATE:
        model = _meta_image_model(arch, kwargs, spec)
    removed = config.get("removed_stages", [])
    if not isinstance(removed, list) or any(name not in model.stages for name in removed):
        raise UnsupportedModelError(f"{spec!r}: \"removed_stages\" in config.json must list stages of {arch} "
                                    f"({', '.join(model.stages)}), not {removed!r}.")
    for name in removed:  # an exported copy with stages bypassed
        model.stages[name] = torch.nn.Identity()
    where = devices.placement(device, dtype, config)
    preflight.check_memory(spec, preflight.model_bytes(model), file_bytes, available_bytes, where.dtype)
    state = ckpt.load_safetensors(file, spec) if header is not None else ckpt.load_pickled_state(file, spec, root)
    mismatch = preflight.plain_mismatch(model, ckpt.tensor_shapes(state))
    if mismatch:
        raise NoCheckpointError(mismatch.message(spec, file.name, "config.json"))
    expected = model.state_dict()
    model.load_state_dict({k: v.to(where.device, where.dtype if expected[k].is_floating_point() else expected[k].dtype)
                           for k, v in state.items()}, assign=True)
    _check_finite(model.state_dict().items(), spec)
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
