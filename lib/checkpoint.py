"""Read the files of a checkpoint folder without building a model, and write an image
model's folder (`save_image_model`).

config.json, safetensors headers (shapes only, no tensor data), pickled state dicts
and the list of files `from_pretrained` would read; a file that is broken is refused
with a message that names it and says what is wrong with it. `lib.preflight` then
checks what these files describe against free memory and against each other.

Only regular files inside the model's folder are read (`check_folder`, `check_file`):
one server serves every browser session, so a folder whose config.json is a named pipe
(the read blocks forever), a link to /dev/zero (it never ends) or a link to a file
elsewhere on the server (its content would be read, and quoted in an error) is
refused before anything is opened, naming the file and never quoting it.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import struct
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from lib.errors import NoCheckpointError

Shapes = dict[str, tuple[int, ...]]

SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                           "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
                           "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "C64": 8}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
MAX_CONFIG_BYTES = 16 * 2**20  # real configs take a few kB; a huge one is not read into memory
MAX_INDEX_BYTES = 16 * 2**20  # a shard index lists every tensor: a few hundred kB for the largest models
MAX_FOLDER_ENTRIES = 10_000  # a checkpoint folder holds tens of files; more is not a checkpoint
MAX_SIDE_FILE_BYTES = 64 << 20  # tokenizer and config files: the largest real tokenizer.json is about 35 MB
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
RESAVE = "Save the model again, e.g. model.save_pretrained(folder)."
COPY_IN = "Copy the file itself into the folder (LayerScope reads only regular files inside the model's folder)."
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


# ---- which files may be read -------------------------------------------------------------------


def check_file(path: Path, root: Path, spec: str) -> os.stat_result:
    """Refuse `path` unless, with every link resolved, it is a regular file inside `root`
    (an already resolved folder); its stat otherwise. Nothing is opened: a named pipe
    would block the open itself. Messages name the file, never its content or target."""
    shown = _shown(path, root)
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        why = "is a link to a file that does not exist" if path.is_symlink() else "does not exist"
        raise NoCheckpointError(f"{spec!r}: {shown} {why}. {COPY_IN}") from None
    except (OSError, RuntimeError):  # a link loop, a file we may not look at
        raise NoCheckpointError(f"{spec!r}: {shown} cannot be followed to a file (a loop of links, or no "
                                f"permission). {COPY_IN}") from None
    if not real.is_relative_to(root):
        raise NoCheckpointError(f"{spec!r}: {shown} is a link to a file outside the model's folder. {COPY_IN}")
    info = os.stat(real)
    if not stat.S_ISREG(info.st_mode):
        kind = next((k for test, k in _KINDS if test(info.st_mode)), "not a regular file")
        raise NoCheckpointError(f"{spec!r}: {shown} is {kind}, not a regular file, so it cannot hold model "
                                f"files. {COPY_IN}")
    if not os.access(real, os.R_OK):
        raise NoCheckpointError(f"{spec!r}: {shown} cannot be read: the server's user has no permission to read "
                                "it. Make it readable (e.g. chmod a+r on the file).")
    return info


def check_folder(folder: Path, root: Path, spec: str) -> None:
    """Refuse `folder` unless every file in it that a loader may open (transformers reads
    config, tokenizer, chat-template and weight files by name, from subfolders too) is a
    regular file inside `root`, and no linked subfolder leads out of it. Hidden entries
    (.git, .cache) are skipped: no loader reads them."""
    count = 0
    for top, dirs, files in os.walk(folder):  # links to folders are listed in dirs, never entered
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in dirs + sorted(f for f in files if not f.startswith(".")):
            count += 1
            if count > MAX_FOLDER_ENTRIES:
                raise NoCheckpointError(f"{spec!r} holds more than {MAX_FOLDER_ENTRIES:,} files, so it is not a "
                                        "checkpoint folder. Give the folder that save_pretrained wrote.")
            path = Path(top) / name
            if name not in dirs and check_file(path, root, spec).st_size > MAX_SIDE_FILE_BYTES \
                    and path.suffix not in WEIGHT_SUFFIXES:
                raise NoCheckpointError(f"{spec!r}: {_shown(path, root)} is larger than {MAX_SIDE_FILE_BYTES >> 20} "
                                        "MB; tokenizer and config files are far smaller, so it is not one.")
            elif path.is_symlink() and not path.resolve().is_relative_to(root):
                raise NoCheckpointError(f"{spec!r}: {_shown(path, root)} is a link to a folder outside the "
                                        f"model's folder. {COPY_IN}")


def contained(folder: Path, name: str, root: Path, spec: str, listed_in: str) -> Path:
    """`folder / name` for a file name another file lists (a shard in an index): a
    relative path that stays inside the folder, to a regular file inside `root`."""
    if not names_inside(name):
        raise NoCheckpointError(f"{spec!r}: {listed_in} names the file {_short(name)}, which is not inside the "
                                f"model's folder. Files it lists must lie in the folder itself. {RESAVE}")
    path = folder / name
    check_file(path, root, spec)
    return path


def names_inside(name: str) -> bool:
    """A relative path with no '..' (before any link is followed: `check_file` does that)."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


def read_bounded(path: Path, root: Path, spec: str, limit: int) -> bytes:
    """The bytes of a regular file inside `root` of at most `limit` bytes (checked before
    it is opened, and again on the open file, so a file swapped in between cannot block
    or run on)."""
    info = check_file(path, root, spec)
    if info.st_size > limit:
        raise NoCheckpointError(f"{spec!r}: {_shown(path, root)} is {info.st_size / 2**20:.0f} MiB, far more than "
                                "this kind of file takes, so it is not read.")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise NoCheckpointError(f"{spec!r}: {_shown(path, root)} changed into something other than a regular "
                                    f"file while it was read. {COPY_IN}")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise NoCheckpointError(f"{spec!r}: {_shown(path, root)} grew past {limit / 2**20:.0f} MiB while it was "
                                "read, so it is not read.")
    return data


def _shown(path: Path, root: Path) -> str:
    """`path` as a message names it: relative to the folder when it lies under it (for a
    hub cache snapshot, whose root is the repository's cache folder, below snapshots/<commit>)."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return path.name
    if root.name.startswith("models--") and parts[:1] == ("snapshots",):
        parts = parts[2:]
    return "/".join(parts) or path.name


def _short(text: str, limit: int = 80) -> str:
    """`text` quoted, cut to `limit` characters (a name from a file may be of any length)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ---- files -------------------------------------------------------------------------------------


def read_config(path: Path, spec: str, root: Path | None = None) -> dict:
    """config.json as a dict; a file that is not a JSON object is refused in words. It must
    be a regular file inside `root` (default: its own folder, resolved), and no larger than
    MAX_CONFIG_BYTES."""
    root = path.parent.resolve() if root is None else root
    if check_file(path, root, spec).st_size > MAX_CONFIG_BYTES:
        raise NoCheckpointError(f"{spec!r}: config.json is {path.stat().st_size / 2**20:.0f} MiB, far more than any "
                                "model's settings take (a few kB), so it is not a model config.")
    try:
        text = read_bounded(path, root, spec, MAX_CONFIG_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise NoCheckpointError(f"{spec!r}: config.json is not a text file (it is not UTF-8), so it holds no "
                                f"model settings. {RESAVE}") from None
    if not text.strip():
        raise NoCheckpointError(f"{spec!r}: config.json is empty, so it says nothing about the model. {RESAVE}")
    try:
        config = json.loads(text)
    except RecursionError:
        raise NoCheckpointError(f"{spec!r}: config.json nests lists or objects too deeply to be read (more than "
                                f"about a thousand levels; a model's settings nest two or three). {RESAVE}") from None
    except json.JSONDecodeError as e:
        # the parser's own words, never the file's: on a shared server a visitor may name any folder
        near = " (at the end of the file)" if not text[e.pos:].strip() else f" ({e.msg[0].lower()}{e.msg[1:]})"
        raise NoCheckpointError(
            f"{spec!r}: config.json is not valid JSON: it breaks the JSON rules at line {e.lineno}, column "
            f"{e.colno}{near}. Fix the file or save the model again: model.save_pretrained(folder)."
        ) from None
    if not isinstance(config, dict):
        raise NoCheckpointError(f"{spec!r}: config.json holds a JSON {_json_kind(config)}, not an object of "
                                f"model settings such as {{\"model_type\": \"gpt2\", ...}}. {RESAVE}")
    return config


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "true/false value", type(None): "null"}.get(type(value), "number")


def safetensors_shapes(path: Path, spec: str, root: Path | None = None) -> Shapes:
    """Tensor shapes from a safetensors header (no tensor data is read); the header and
    the data offsets are checked against the file size, so a truncated file is caught.
    The file must be a regular file inside `root` (default: its own folder)."""
    size = check_file(path, path.parent.resolve() if root is None else root, spec).st_size

    def broken(why: str) -> NoCheckpointError:
        return NoCheckpointError(f"{spec!r}: {path.name} is not a valid safetensors file ({why}). {RESAVE}")

    if size == 0:
        raise NoCheckpointError(f"{spec!r}: {path.name} is empty (0 bytes): the weights were never written. "
                                f"{RESAVE}")
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise broken(f"it is only {size} bytes long")
        (n_header,) = struct.unpack("<Q", head)
        if n_header > min(size - 8, MAX_HEADER_BYTES):
            raise broken(f"it does not start with a safetensors header: its first 8 bytes give a header of "
                         f"{n_header:,} bytes in a file of {size:,}; the file is truncated or not safetensors at all")
        raw = f.read(n_header)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise broken("its header is not JSON") from None
    if not isinstance(header, dict):
        raise broken("its header is not a JSON object")
    n_data = size - 8 - n_header
    shapes: Shapes = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(s) for s in shape)
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise broken(f"its header entry for {name!r} has no dtype, shape and data offsets") from None
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= n_data:
            raise broken(f"tensor {name!r} points outside the file; the file is truncated or corrupt")
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            raise broken(f"tensor {name!r} has the dtype {_short(str(dtype), 20)}, which is none of the safetensors "
                         f"dtypes LayerScope reads ({', '.join(SAFETENSORS_DTYPE_BYTES)})")
        if end - begin != numel(shape) * SAFETENSORS_DTYPE_BYTES[dtype]:
            raise broken(f"tensor {name!r} of shape {list(shape)} ({dtype}) does not fill its {end - begin} bytes")
        shapes[name] = shape
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):  # the format's rule: byte ranges follow on, no overlap, no gap
        if begin != at:
            how = "leaves a gap after" if begin > at else "overlaps"
            raise broken(f"tensor {name!r} (bytes {begin} to {end} of the data) {how} the tensor before it, "
                         f"which ends at byte {at}")
        at = end
    if at != n_data:
        raise broken(f"its tensors end at byte {at} of the data, but the file holds {n_data} bytes of data")
    from safetensors import SafetensorError, safe_open

    try:  # whatever else the safetensors reader itself rejects (it reads the header only)
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as e:
        raise broken(f"the safetensors reader says: {first_line(e)}") from None
    return shapes


def load_safetensors(path: Path, spec: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file whose header `safetensors_shapes` accepted."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise NoCheckpointError(f"{spec!r}: {path.name} is not a valid safetensors file ({first_line(e)}). "
                                f"{RESAVE}") from None


def load_pickled_state(path: Path, spec: str, root: Path | None = None) -> dict[str, torch.Tensor]:
    """A pickled state dict read with `torch.load(weights_only=True)` (memory-mapped when
    the file allows); anything but a mapping from names to tensors is refused in words.
    The file must be a regular file inside `root` (default: its own folder)."""
    if check_file(path, path.parent.resolve() if root is None else root, spec).st_size == 0:
        raise NoCheckpointError(f"{spec!r}: {path.name} is empty (0 bytes): the weights were never written.")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # old (non-zip) format
    except pickle.UnpicklingError as e:
        why = ("it holds Python objects other than tensors, which safe loading refuses"
               if "Unsupported global" in str(e) else "it is not a file written by torch.save")
        raise NoCheckpointError(f"{spec!r}: {path.name} cannot be read as a PyTorch state dict: {why}.") from None
    except (RuntimeError, EOFError, ValueError, OSError, struct.error):
        raise NoCheckpointError(f"{spec!r}: {path.name} cannot be read as a PyTorch state dict: it is not a "
                                "file written by torch.save (or it is truncated).") from None
    return _as_state_dict(state, path, spec)


def _as_state_dict(state: Any, path: Path, spec: str) -> dict[str, torch.Tensor]:
    def refuse(what: str) -> NoCheckpointError:
        return NoCheckpointError(
            f"{spec!r}: {path.name} {what}, so it is not a state dict (a mapping from tensor names to "
            "tensors, what torch.save(model.state_dict(), file) writes).")

    if not isinstance(state, dict):
        raise refuse(f"holds a {type(state).__name__}")
    if not state:
        raise refuse("holds an empty dict")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise refuse(f"holds the entry {name!r} of type {type(value).__name__}, not a tensor")
    return state


def tensor_shapes(state: dict[str, torch.Tensor]) -> Shapes:
    return {name: tuple(t.shape) for name, t in state.items()}


def hf_weight_files(folder: Path, spec: str, allow_pickle: bool, root: Path | None = None) -> list[Path]:
    """The files `from_pretrained` reads, in its order of preference: model.safetensors
    (or the shards its index lists), then, only with allow_pickle, pytorch_model.bin.
    Each is a regular file inside `root` (default: the folder, resolved)."""
    root = folder.resolve() if root is None else root
    kinds = [("model.safetensors", "model.safetensors.index.json")]
    if allow_pickle:
        kinds.append(("pytorch_model.bin", "pytorch_model.bin.index.json"))
    for single, index in kinds:
        if (folder / index).exists() or (folder / index).is_symlink():
            return _shards(folder / index, spec, root)
        if (folder / single).exists() or (folder / single).is_symlink():
            check_file(folder / single, root, spec)
            return [folder / single]
    expected = " or ".join(f"{s} (or shards listed in {i})" for s, i in kinds)
    raise NoCheckpointError(f"{spec!r} has weight files, but none under the name transformers reads: {expected}. "
                            "Rename the file, or save the model with model.save_pretrained(folder).")


def _shards(index: Path, spec: str, root: Path) -> list[Path]:
    """The shard files an index lists: relative names of regular files inside the folder
    (an index naming ../other/pytorch_model.bin or /abs/path is refused, not followed)."""
    try:
        weight_map = json.loads(read_bounded(index, root, spec, MAX_INDEX_BYTES).decode("utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
        if not all(isinstance(n, str) for n in names):
            raise TypeError
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError, AttributeError):
        raise NoCheckpointError(f"{spec!r}: {index.name} is not a valid shard index (a JSON object with a "
                                f"\"weight_map\" from tensor names to files). {RESAVE}") from None
    if not names:
        raise NoCheckpointError(f"{spec!r}: {index.name} lists no shards (its \"weight_map\" is empty), so it points "
                                f"to no weights. {RESAVE}")
    outside = [n for n in names if not names_inside(n)]
    if outside:
        raise NoCheckpointError(f"{spec!r}: {index.name} names shards outside the model's folder: "
                                f"{', '.join(map(_short, outside[:3]))}. Shards must lie in the folder itself; "
                                f"{RESAVE}")
    missing = [n for n in names if not os.path.lexists(index.parent / n)]
    if missing:
        raise NoCheckpointError(f"{spec!r}: {index.name} lists shards that are not in the folder: "
                                f"{', '.join(map(_short, missing[:3]))}. Copy every shard into the folder.")
    return [contained(index.parent, n, root, spec, index.name) for n in names]


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def shapes_bytes(shapes: Shapes) -> int:
    """float32 bytes of the tensors in `shapes`."""
    return 4 * sum(numel(s) for s in shapes.values())


def first_line(e: BaseException) -> str:
    """An exception's first line (and the next, when the first ends in a colon), at most
    200 characters: enough to say what failed without a page of internals."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    text = lines[0] + (" " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else "")
    return text if len(text) <= 200 else text[:200] + "..."


# ---- writing -----------------------------------------------------------------------------------


def save_image_model(model: torch.nn.Module, architecture: str, folder: Path, removed_stages: tuple[str, ...] = (),
                     **kwargs) -> None:
    """Write an image model as safetensors + config.json (loadable by `load_model`);
    `removed_stages` are stages replaced by the identity (they hold no weights)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    config = {"layerscope_architecture": architecture, "kwargs": kwargs}
    if removed_stages:
        config["removed_stages"] = list(removed_stages)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
