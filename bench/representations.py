"""Representations row (issue 31 target: every linear probe at every depth <= 3 forwards:
one recording pass feeds every probe)."""

from __future__ import annotations

import time
from typing import Callable

from analysis.representations.dataset import probe_text
from analysis.representations.probes import probe_layers
from bench.common import Row, Setup, measure, tokens_text


def probes_row(setup: Setup) -> Row:
    """The recorded pass plus every probe (properties x depths, each with its control task)
    against a plain forward over the same windows of held-out source. Labelling the text with
    tokenize and ast depends on the text alone (the app does it once) and is timed apart."""
    handle = setup.handle
    n, seq = setup.batch.tokens.shape
    start = time.perf_counter()
    text = probe_text(handle, n_windows=n, seq_len=seq)
    labelling = time.perf_counter() - start
    t = measure(lambda: probe_layers(handle, text), lambda: handle.forward(text.tokens), setup.repeats)
    result = probe_layers(handle, text)
    P, D = len(result.properties), len(result.depth_labels)
    return Row.timed("probe all layers / forward", t,
                     f"{P} properties x {D} depths, each with its control task, from one recorded pass over "
                     f"{tokens_text(text)} of held-out source (target <= 3); labelling the text with tokenize "
                     f"and ast {labelling:.1f} s once per text")


ROWS: tuple[Callable[[Setup], Row], ...] = (probes_row,)
