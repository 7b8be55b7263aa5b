"""A real int8 CPU kernel next to the simulation: torch's dynamic int8 linear layers
(fbgemm / oneDNN; weights int8 per output channel, inputs quantized per batch on the fly),
measured for latency, weight memory and quality against the same model in float32, and
the simulation's INT8 of the same layers beside it (its quality, not its speed).
Convolutions have no such kernel and stay in float."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from analysis.compress.edits import apply_
from analysis.compress.quant.quantize import Quantize
from lib import data
from lib.handle import ModelHandle
from lib.metrics import Metrics, metrics_from_outputs, model_inputs


@dataclass(frozen=True)
class KernelComparison:
    """float_ms, int8_ms: median latency of a forward on the batch, [repeats] interleaved;
    float_bytes, int8_bytes: memory of the converted layers' weights (and biases) as the
    float model holds them and as the int8 kernel holds them (codes, per-channel scales and
    zero points, float biases); metrics: the int8 model's quality against the float one."""

    layers: tuple[str, ...]
    float_ms: float
    int8_ms: float
    float_bytes: int
    int8_bytes: int
    metrics: Metrics
    repeats: int

    @property
    def speedup(self) -> float:
        return self.float_ms / self.int8_ms

    def sentence(self) -> str:
        return (f"torch's int8 kernel on {len(self.layers)} fully connected layers: a forward takes "
                f"{self.int8_ms:.1f} ms against {self.float_ms:.1f} ms in float32 ({self.speedup:.2f}x); their "
                f"weights take {self.int8_bytes / 2**20:.2f} MiB instead of {self.float_bytes / 2**20:.2f} MiB.")


@torch.no_grad()
def int8_kernel_comparison(handle: ModelHandle, batch: data.Batch | None = None, repeats: int = 5,
                           progress: Callable[[float, str], None] | None = None) -> KernelComparison:
    """Measure `handle` (as it is, edits included) against a copy whose fully connected
    layers run torch's dynamic int8 kernel, on the evaluation batch (or `batch`).
    `progress(fraction, message)` after each forward, outside the timed ones."""
    total = 2 + 2 * repeats

    def told(done: int) -> None:
        if progress:
            progress(done / total, f"{done} of {total} forwards")

    batch = batch or data.default_batch(handle)
    inputs = model_inputs(batch)
    layers = handle.linear_layers()
    # the unembedding is left out: it is tied to the embedding, whose float copy would stay
    fast, sizes = handle.int8_kernel_copy([n for n in layers if handle.place(n)[0] is not None])
    float_bytes = 0
    for name in sizes:
        float_bytes += layers[name].numel() * layers[name].element_size()
        bias = handle.weights().get(handle.weight_name(name).removesuffix("weight") + "bias")
        float_bytes += 0 if bias is None else bias.numel() * bias.element_size()
    reference, quantized = handle.forward(inputs), fast.forward(inputs)
    told(2)
    times: dict[str, list[float]] = {"float": [], "int8": []}
    for k in range(repeats):  # interleaved, alternating order: a drift in machine speed favours neither
        pair = [("float", handle), ("int8", fast)]
        for key, model in pair if k % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            model.forward(inputs)
            times[key].append((time.perf_counter() - start) * 1000)
            told(2 + len(times["float"]) + len(times["int8"]))
    size_bits = handle.size_bits + 8 * (sum(sizes.values()) - float_bytes)
    metrics = metrics_from_outputs(quantized, batch, fast.n_params, size_bits, reference)
    return KernelComparison(tuple(sizes), statistics.median(times["float"]), statistics.median(times["int8"]),
                            float_bytes, sum(sizes.values()), metrics, repeats)


@dataclass(frozen=True)
class SimulatedInt8:
    """The simulation's INT8 (`Quantize("int8")`) of some layers: the copy's metrics against
    the model it was made from, and the bits those layers take as stored (codes + scales)."""

    metrics: Metrics
    bits: int


@torch.no_grad()
def simulated_int8(handle: ModelHandle, batch: data.Batch, layers: Sequence[str]) -> SimulatedInt8:
    """Quantize the linear layers `layers` of a private copy of `handle` to INT8 the way the
    lab simulates it (for an LM every block's layers, as the kernel converts them; for an
    image model the stages that hold `layers`) and measure it against `handle` on `batch`:
    the simulated side of `int8_kernel_comparison`."""
    copy = handle.private_copy()
    if handle.kind == "causal-lm":
        apply_(copy, Quantize("int8"))
    else:
        apply_(copy, Quantize("int8", "layers", tuple(dict.fromkeys(handle.place(n)[0] for n in layers))))
    inputs = model_inputs(batch)
    metrics = metrics_from_outputs(copy.forward(inputs), batch, copy.n_params, copy.size_bits, handle.forward(inputs))
    bits = sum(copy.storage[copy.weight_name(n)].bits for n in layers if copy.weight_name(n) in copy.storage)
    return SimulatedInt8(metrics, bits)
