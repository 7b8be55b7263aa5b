"""How a metric's value and its change read, the same on every page: shares (accuracy,
top-1 agreement) as percentages and their changes in percentage points, as the Model page
and the lab show them; every other number with four significant figures in plain digits
(thousands separated), never "-5.152e+05" at an ordinary magnitude."""

from __future__ import annotations

import math

PERCENT_METRICS = frozenset({"accuracy", "agreement"})

# Beyond these magnitudes plain digits stop being readable ("0.00000001234",
# "123,400,000,000,000,000"): scientific notation says more there.
_PLAIN_MIN, _PLAIN_MAX = 1e-4, 1e15


def readable(x: float, digits: int = 4, signed: bool = False) -> str:
    """`x` rounded to `digits` significant figures in plain decimal notation, thousands
    separated, trailing zeros dropped: -515234 -> "-515,200", 0.031954 -> "0.03195",
    1.0 -> "1"; with `signed` a "+" before positive numbers. Scientific notation only
    below 1e-4 or from 1e15 on in magnitude."""
    sign = "+" if signed else ""
    magnitude = abs(x)
    if not math.isfinite(x) or magnitude == 0 or not _PLAIN_MIN <= magnitude < _PLAIN_MAX:
        return f"{x:{sign}.{digits}g}"
    places = digits - 1 - math.floor(math.log10(magnitude))  # decimals that keep `digits` figures
    text = f"{round(x, places):{sign},.{max(places, 0)}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def metric_value(metric: str, value: float) -> str:
    """A metric's value as pages show it: 0.9834 accuracy -> "98.3%", 3.2104 bits per byte -> "3.21"."""
    return f"{value:.1%}" if metric in PERCENT_METRICS else readable(value)


def metric_change(metric: str, delta: float) -> str:
    """A change of a metric, signed: -0.0312 accuracy -> "-3.1 points" (percentage points,
    not a relative change), -515234 parameters -> "-515,200"."""
    return f"{100 * delta:+.1f} points" if metric in PERCENT_METRICS else readable(delta, signed=True)


def size_text(bits: int, signed: bool = False) -> str:
    """A model's size as the metric tiles show it: MiB below 1 GiB, else GiB ("2357.13 MiB" did
    not fit a tile: Llama-3.2-1B's 2.30 GiB)."""
    n_bytes = bits / 8
    unit, scale = ("GiB", 2**30) if abs(n_bytes) >= 2**30 else ("MiB", 2**20)
    return f"{n_bytes / scale:{'+' if signed else ''}.2f} {unit}"


def duration_text(seconds: float) -> str:
    """An estimate's duration: "about 40 s" below 2 minutes, else "about 23 min"."""
    return f"about {seconds:.0f} s" if seconds < 120 else f"about {seconds / 60:.0f} min"
