"""Process-wide caches for results too large or too slow to pass through
`st.cache_data` (which pickles and copies its value on every hit).

`TensorStore` keeps values as they are, keyed like `st.cache_data` (model fingerprint
+ the parameters a value depends on), and evicts the least recently used ones when
the tensors it holds pass a memory bound. Values are shared between sessions and must
be treated as read-only.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch

STORE_SHARE = 0.25  # of the machine's memory the shared store may hold: room for one 1B model's residuals and
# base outputs together (3.1 + 2 GB at Llama-1B's default batch), so switching pages does not recompute them


def default_max_bytes() -> int:
    """4 GiB, or a quarter of this machine's memory when that is more."""
    import psutil

    return max(4 * 2**30, int(STORE_SHARE * psutil.virtual_memory().total))


DEFAULT_MAX_BYTES = default_max_bytes()


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor reachable through dataclass fields, dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


class TensorStore:
    """A no-copy LRU cache bounded by the bytes of the tensors it holds.

    A value larger than the whole bound is computed and returned but not kept.
    Two sessions asking for the same missing key at once may both compute it; the
    second result replaces the first (they are equal).
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_entries: int = 64) -> None:
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._items.values())

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key][0]

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        found = self.get(key)
        if found is not None:
            return found
        value = compute()
        self.put(key, value)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        size = tensor_bytes(value)
        if size > self.max_bytes:
            return
        with self._lock:
            self._items[key] = (value, size)
            self._items.move_to_end(key)
            total = sum(n for _, n in self._items.values())
            while self._items and (total > self.max_bytes or len(self._items) > self.max_entries):
                _, (_, freed) = self._items.popitem(last=False)
                total -= freed

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


STORE = TensorStore()
