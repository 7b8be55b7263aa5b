"""The no-copy store for large results: same object on a hit, bounded by tensor bytes."""

from dataclasses import dataclass

import torch

from ui.store import TensorStore, tensor_bytes


@dataclass(frozen=True)
class Result:
    logits: torch.Tensor
    parts: dict


def test_second_hit_returns_the_same_object_without_recomputing():
    store, calls = TensorStore(max_bytes=10_000), []

    def compute():
        calls.append(1)
        return torch.zeros(100)

    first = store.get_or_compute(("logits", "abc"), compute)
    second = store.get_or_compute(("logits", "abc"), compute)
    assert second is first and calls == [1]


def test_memory_bound_evicts_least_recently_used():
    store = TensorStore(max_bytes=1000)  # room for two 400-byte tensors
    a, b, c = (torch.zeros(100) for _ in range(3))
    store.put("a", a)
    store.put("b", b)
    assert store.get("a") is a  # a is now the most recently used
    store.put("c", c)
    assert store.get("b") is None and store.get("a") is a and store.get("c") is c
    assert store.nbytes == 800
    store.put("huge", torch.zeros(1000))  # larger than the bound: not kept
    assert store.get("huge") is None and store.nbytes == 800


def test_tensor_bytes_walks_results():
    value = Result(torch.zeros(10, 3), {"x": [torch.zeros(5, dtype=torch.float64)], "n": 3})
    assert tensor_bytes(value) == 10 * 3 * 4 + 5 * 8
