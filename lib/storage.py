"""How a model's tensors are stored and identified: `StoredAs` (a quantized or removed
tensor's bits as stored), the fingerprint of a set of weights, and the helpers that
copy a model's tensors without pulling apart views of one storage.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class StoredAs:
    """How one weight tensor is stored when it is not the plain float tensor in memory:
    `bits` in total (codes + scales + zero points for a quantized tensor, 0 for a
    removed one) and a short description ("int4 g128", "removed")."""

    bits: int
    format: str

    @property
    def removed(self) -> bool:
        return self.format == "removed"


def quantized_bits(numel: int, code_bits: int, n_groups: int, scale_bits: int = 16, zero_bits: int = 0) -> int:
    """Storage of a quantized tensor: a code per element plus a scale (and a zero point,
    for asymmetric formats) per group."""
    return numel * code_bits + n_groups * (scale_bits + zero_bits)


HASH_CHUNK_BYTES = 16 * 2**20  # a fingerprint reads a tensor this many bytes at a time


def weight_fingerprint(tensors: Iterator[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of every tensor, in name order.
    Equal fingerprints mean bit-identical weights. Each tensor is read a chunk at a time
    through a fresh copy of the chunk: handing a weight's own memory to numpy would count
    as a write and give a lazily copied weight (`lazy_copy_memo`) storage of its own."""
    digest = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        flat = t.detach().reshape(-1)
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        step = max(1, HASH_CHUNK_BYTES // max(t.element_size(), 1))
        for start in range(0, flat.numel(), step):
            chunk = flat[start:start + step].to("cpu", copy=True)
            digest.update(chunk.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def storage_key(t: torch.Tensor) -> int:
    """Which storage `t` lives in (equal for views of one storage), read without touching
    its memory: `data_ptr()` counts as a write, and a write to a lazily copied tensor
    gives it memory of its own."""
    return t.untyped_storage()._cdata


def _whole(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (storage.nbytes(),), (1,))


def _lazy_clone(group: list[torch.Tensor]) -> torch.UntypedStorage:
    """A copy of the storage the tensors of `group` share, made lazily (torch's
    copy-on-write clone) where the memory allows it, else a plain clone.

    Memory a loader mapped from a checkpoint file cannot be copied lazily; such a storage is
    first moved onto plain memory, once, by pointing the original tensors at a clone of it
    (the same values: the model is unchanged), so every later copy is lazy. The mapped pages
    it leaves are handed back as it goes (`_hand_back`), so the move never holds the model twice."""
    first = group[0]
    whole = _whole(first.untyped_storage(), first.device)
    try:
        return torch._lazy_clone(whole).untyped_storage()
    except RuntimeError:
        pass
    plain = whole.clone().untyped_storage()
    with torch.no_grad():
        for t in group:
            t.set_(plain, t.storage_offset(), t.shape, t.stride())
    if whole.device.type == "cpu":
        _hand_back(whole.data_ptr(), whole.numel())
    del whole
    try:
        return torch._lazy_clone(_whole(plain, first.device)).untyped_storage()
    except RuntimeError:  # a device without copy-on-write: a plain copy
        return plain.clone()


MAPPED_CHECKPOINTS = (".safetensors", ".bin")  # files a loader maps weights from
MADV_DONTNEED = 4  # Linux: the pages are dropped; a file mapping's are read from the file again if touched


def _hand_back(address: int, nbytes: int) -> None:
    """Give the kernel back the whole pages of [address, address + nbytes) where they lie in
    a private mapping of a checkpoint file (Linux), which nothing reads once the tensors that
    lived there were moved: without this the mapping stays resident until its last tensor
    moves, and moving a model would hold it twice. Memory of any other kind is left alone."""
    if sys.platform != "linux":
        return
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return
    page = mmap.PAGESIZE
    start, stop = -(-address // page) * page, (address + nbytes) // page * page
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1][3] != "p" or not fields[5].endswith(MAPPED_CHECKPOINTS):
            continue
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= start < stop <= high:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), MADV_DONTNEED)
            return


def lazy_copy_memo(model: nn.Module) -> dict[int, torch.Tensor]:
    """Copies, made in advance, of every parameter and buffer of `model`, for the memo of
    `copy.deepcopy(model, memo)`.

    The copies share memory with the originals until one side writes (copy-on-write), so
    a copy costs nothing until an edit rewrites a tensor, and then only that tensor's
    storage: dropping blocks or pruning a few layers takes no second copy of the model.
    Tensors that are views of one storage (TransformerLens splits GPT-2's fused qkv weight
    into q, k and v views; the fast path reads the fused one) stay views of one copied
    storage, so a write through one is seen through the others, as in the original.
    """
    groups: dict[int, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            groups.setdefault(storage_key(t), []).append(t)
    memo: dict[int, torch.Tensor] = {}
    for group in groups.values():
        copied = _lazy_clone(group)
        for t in group:
            view = torch.empty(0, dtype=t.dtype, device=t.device).set_(copied, t.storage_offset(), t.shape, t.stride())
            memo[id(t)] = nn.Parameter(view, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else view
    return memo


def owned_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the distinct storages among `tensors` that share memory with no other
    tensor: what a lazily made copy (`lazy_copy_memo`) has written, and so holds alone."""
    cow = getattr(torch._C, "_is_cow_tensor", lambda t: False)
    sizes = {storage_key(t): t.untyped_storage().nbytes() for t in tensors if not cow(t)}
    return sum(sizes.values())


def distinct_tensors(named: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, t in named:
        key = (storage_key(t), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out
