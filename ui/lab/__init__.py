"""The compression lab's page parts and its method families.

    panels    the page's panels: controls, recipe list, metrics, history, per-layer view,
              downloads and upload; every change of the recipe under a progress bar
    journal   the table of this visitor's experiments on the model (CSV, forget a row)
    methods   what a method family is (`Method`) and the widgets families share
    prune     magnitude, Wanda, heads, drops, stage bypass, layer skipping
    alloc     rate-distortion allocation, evolutionary search, low rank, shared blocks
    quant     quantized weights, LLM.int8, mixed precision (with the real int8 kernel)
    exits     early exits

A family's module lists its methods in `METHODS`; `METHODS` here lists the families in
the order of the lab's method menu. A new family is one module and one entry below.
"""

from __future__ import annotations

from lib.handle import ModelHandle
from ui.lab import alloc, exits, prune, quant
from ui.lab.methods import Method

METHODS: tuple[Method, ...] = prune.METHODS + alloc.METHODS + quant.METHODS + exits.METHODS


def methods_for(handle: ModelHandle) -> list[Method]:
    """The methods the lab offers for this model, in menu order."""
    return [m for m in METHODS if handle.kind in m.kinds and m.available(handle)]
