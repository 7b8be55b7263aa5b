"""How long a model takes: timed forwards with the interval of their median (`time_forward`,
`base_timing` on the first rows of a batch, or the first tokens of one row, when all of it
would take too long: `timed_part`), an edited
model against its base in alternating pairs (`compare_latency`), and FLOPs (`count_flops`).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from lib.handle import ModelHandle
from lib.scoring import Logits

LATENCY_REPEATS = 6  # timed forwards (or base/model pairs) behind every latency the app shows: the fewest
# for which the smallest and largest of them bound the median with >= 95 % confidence (1 - 2/2**6)
LATENCY_SECONDS = 0.2  # a fast model is timed over more calls than asked, so scheduler noise averages out
LATENCY_MAX_CALLS = 40
LATENCY_BUDGET_SECONDS = 3.0  # a slow model is timed on fewer rows of the batch rather than for minutes
MIN_TIMED_POSITIONS = 16  # the fewest tokens of a row a model too slow for one whole row is timed on
MIN_LATENCY_CHANGE = 0.05  # below this a ratio is not called a change: timing on a shared machine moves this much
NOISY_SPREAD = 0.1  # a ratio interval wider than this: time more pairs (within the budget), then call it noisy
NOISY_BUDGET_SECONDS = 6.0  # pairs timed while the interval stays wide: from 9 pairs on, it drops the extremes
Clock = Callable[[], float]


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of `values`: order statistics x_(k) and
    x_(n+1-k) with the largest k for which P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2;
    the smallest and largest value when n is too small for that (n < 6 at 95 %)."""
    x = sorted(values)
    n = len(x)
    tail, k = 0.0, 0
    while k < n // 2:
        tail += math.comb(n, k) / 2**n  # P(X = k) added: P(X <= k)
        if tail > (1 - confidence) / 2:
            break
        k += 1
    k = max(k, 1)
    return x[k - 1], x[n - k]


@dataclass(frozen=True)
class Timing:
    """Timed forwards over `rows` rows of the evaluation batch (sequences or images), or
    over the first `positions` tokens of its first row (a model too slow to time one row
    within the budget: `timed_part`): median_ms, the interval of the median (low_ms,
    high_ms; `median_interval`) and how many forwards were timed (runs)."""

    median_ms: float
    low_ms: float
    high_ms: float
    runs: int
    rows: int
    positions: int | None = None

    def over(self, n_rows: int) -> str:
        """What one timed forward covered, in words: 'the whole batch', '2 of its 16 rows' or
        'the first 16 tokens of one of its rows'."""
        if self.positions is not None:
            return f"the first {self.positions} tokens of one of its rows"
        return "the whole batch" if self.rows == n_rows else f"{self.rows} of its {n_rows} rows"

    def text(self) -> str:
        return f"{self.median_ms:.0f} ms (95 % interval {self.low_ms:.0f}–{self.high_ms:.0f} ms, {self.runs} runs)"


@dataclass(frozen=True)
class LatencyChange:
    """A model's latency against its base, both timed in the same moment: `runs` pairs of
    forwards in alternating order (base then model, model then base, ...), so drift and
    load hit both alike.

    base, model: each one's timings; ratio: median over pairs of model time / base time;
    low, high: the interval of that median (`median_interval`); predicted: the model's
    forward FLOPs over the base's (`count_flops`), None where not counted.
    """

    base: Timing
    model: Timing
    ratio: float
    low: float
    high: float
    predicted: float | None = None

    @property
    def measurable(self) -> bool:
        """Whether the change stands out of the timing noise: the ratio's interval excludes 1
        and is at most NOISY_SPREAD wide (under heavy load six pairs once all fell below 1 for
        a weight-only edit, with an interval -83 % ... -1 %), and the change is at least
        MIN_LATENCY_CHANGE. The pairs share the machine's state, so their ratios are sharper
        than either model's own timings."""
        return not self.low <= 1.0 <= self.high and not self.noisy and abs(self.ratio - 1) >= MIN_LATENCY_CHANGE

    @property
    def noisy(self) -> bool:
        """Whether the machine was too busy to tell: the ratio's interval is wider than
        NOISY_SPREAD."""
        return self.high - self.low > NOISY_SPREAD

    def text(self) -> str:
        """'−31 % (−40 … −20 %)', 'no measurable change (−3 … +4 %)' or 'too noisy to tell (−60 … +9 %)'."""
        spread = f"{self.low - 1:+.0%} … {self.high - 1:+.0%}"
        if self.measurable:
            return f"{self.ratio - 1:+.0%} ({spread})"
        return f"{'too noisy to tell' if self.noisy else 'no measurable change'} ({spread})"


def time_forward(forward: Callable[[], object], repeats: int = LATENCY_REPEATS, rows: int = 1,
                 clock: Clock | None = None, progress: Callable[[float, str], None] | None = None) -> Timing:
    """Time `forward`, which has run once already (a model's first forward also builds what
    later ones reuse): at least `repeats` calls, and more, up to LATENCY_MAX_CALLS, until
    LATENCY_SECONDS have passed. `rows`: what one call covers, for the record; `progress`
    (fraction, message) is told after each call, between the timed ones."""
    clock = clock or time.perf_counter
    times: list[float] = []
    began = clock()
    while len(times) < repeats or (clock() - began < LATENCY_SECONDS and len(times) < LATENCY_MAX_CALLS):
        start = clock()
        forward()
        times.append((clock() - start) * 1000)
        if progress:
            n = len(times)
            progress(min(1.0, n / max(repeats, 1)), f"timed forward {n} of {max(repeats, n)}")
    low, high = median_interval(times)
    return Timing(statistics.median(times), low, high, len(times), rows)


def compare_latency(base: Callable[[], object], model: Callable[[], object], repeats: int = LATENCY_REPEATS,
                    rows: int = 1, predicted: float | None = None, clock: Clock | None = None,
                    progress: Callable[[float, str], None] | None = None, positions: int | None = None
                    ) -> LatencyChange:
    """Time `base` and `model` (each run once already) in alternating pairs: at least
    `repeats` pairs, more (up to LATENCY_MAX_CALLS) while under LATENCY_SECONDS, or while
    the ratio's interval is wider than NOISY_SPREAD and under NOISY_BUDGET_SECONDS. The
    change is the median of the per-pair ratios, with its interval (`rows`, `positions`: what
    one forward covered, for the record: `Timing`). `progress` (fraction,
    message) is told after each pair: the pairs asked for fill the bar's first 80 %, the
    noisy machine's extra pairs (at most NOISY_BUDGET_SECONDS) the rest."""
    clock = clock or time.perf_counter
    base_ms: list[float] = []
    model_ms: list[float] = []
    ratios: list[float] = []
    began = clock()

    def more() -> bool:
        n, elapsed = len(ratios), clock() - began
        if n < repeats:
            return True
        if n >= LATENCY_MAX_CALLS:
            return False
        low, high = median_interval(ratios)
        return elapsed < LATENCY_SECONDS or (high - low > NOISY_SPREAD and elapsed < NOISY_BUDGET_SECONDS)

    while more():
        order = ((base, base_ms), (model, model_ms))
        for forward, times in order if len(base_ms) % 2 == 0 else order[::-1]:
            start = clock()
            forward()
            times.append((clock() - start) * 1000)
        ratios.append(model_ms[-1] / base_ms[-1])
        if progress:
            n = len(ratios)
            extra = min(1.0, (clock() - began) / NOISY_BUDGET_SECONDS) if n > repeats else 0.0
            progress(min(1.0, 0.8 * min(n, repeats) / max(repeats, 1) + 0.2 * extra),
                     f"timed pair {n} of {max(repeats, n)}")
    low, high = median_interval(ratios)

    def timing(times: list[float]) -> Timing:
        return Timing(statistics.median(times), *median_interval(times), len(times), rows, positions)

    return LatencyChange(timing(base_ms), timing(model_ms), statistics.median(ratios), low, high, predicted)


def timed_rows(seconds_per_forward: float, n_rows: int, forwards: int) -> int:
    """Rows of the batch to time so that `forwards` forwards fit LATENCY_BUDGET_SECONDS,
    given that one forward over all `n_rows` took `seconds_per_forward` (at least one row)."""
    if seconds_per_forward * forwards <= LATENCY_BUDGET_SECONDS:
        return n_rows
    return max(1, int(n_rows * LATENCY_BUDGET_SECONDS / (seconds_per_forward * forwards)))


def timed_part(inputs: torch.Tensor, seconds_per_forward: float, forwards: int) -> torch.Tensor:
    """The part of `inputs` to time `forwards` times within LATENCY_BUDGET_SECONDS, given that
    one forward of all of them took `seconds_per_forward`: the first rows that fit
    (`timed_rows`); where even one row of token ids does not, the first positions of it
    that do, at least MIN_TIMED_POSITIONS (a 1B model in bfloat16 took 30 s for one row of
    128 tokens on two CPU cores: eight such forwards made the Model page wait 4 minutes)."""
    n, rows = inputs.shape[0], timed_rows(seconds_per_forward, inputs.shape[0], forwards)
    row_seconds = seconds_per_forward / n
    if rows > 1 or inputs.dim() != 2 or inputs.is_floating_point() or row_seconds * forwards <= LATENCY_BUDGET_SECONDS:
        return inputs[:rows]
    T = inputs.shape[1]
    return inputs[:1, :max(min(MIN_TIMED_POSITIONS, T), int(T * LATENCY_BUDGET_SECONDS / (row_seconds * forwards)))]


def count_flops(forward: Callable[[], object]) -> int:
    """FLOPs torch counts for one call of `forward` (matrix products and convolutions,
    attention included; elementwise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        forward()
    return counter.get_total_flops()


def pace(handle: ModelHandle, inputs: torch.Tensor, repeats: int = LATENCY_REPEATS) -> float:
    """Seconds a forward of all of `inputs` would take, from an untimed forward of one row (an
    overestimate: it carries the fixed costs), not a wait for the whole batch; where the whole
    batch fits the timing, one untimed run of it follows, as `base_timing` needs."""
    start = time.perf_counter()
    handle.forward(inputs[:1])
    whole = (time.perf_counter() - start) * inputs.shape[0]
    if timed_rows(whole, inputs.shape[0], repeats) == inputs.shape[0]:
        handle.forward(inputs)
    return whole


def timed_outputs(handle: ModelHandle, inputs: torch.Tensor, given: Logits | None = None,
                  repeats: int = LATENCY_REPEATS, seconds: float | None = None) -> tuple[Logits, float]:
    """`handle`'s outputs on `inputs` and the seconds a forward of them takes: the forward that
    gives them, timed; or, outputs `given` and forwards to be timed, the `seconds` the forward
    that gave them took in this process, else `pace`'s estimate."""
    if given is None or not repeats:
        start = time.perf_counter()
        outputs = handle.outputs(inputs)  # large logits are read out as they are scored, never held
        return outputs, time.perf_counter() - start
    return given, seconds if seconds is not None else pace(handle, inputs, repeats)


def base_timing(handle: ModelHandle, inputs: torch.Tensor, first_seconds: float,
                repeats: int = LATENCY_REPEATS, progress: Callable[[float, str], None] | None = None,
                warm: bool = True) -> Timing:
    """`handle`'s timed forwards on `inputs` [rows, ...], a forward of which takes
    `first_seconds`: on every row, or on the part of them that `repeats` forwards of fit
    LATENCY_BUDGET_SECONDS (`timed_part`), after one untimed forward of that part unless
    `warm` (a `forward` of all of `inputs` just ran: `pace`'s); `progress` as `time_forward`'s."""
    part = timed_part(inputs, first_seconds, repeats)
    if part.shape != inputs.shape or not warm:
        handle.forward(part)  # a new shape (or a first forward): not timed either
    timing = time_forward(lambda: handle.forward(part), repeats, part.shape[0], progress=progress)
    return replace(timing, positions=cut_positions(part, inputs))


def cut_positions(part: torch.Tensor, inputs: torch.Tensor) -> int | None:
    """The positions of each row `part` of `inputs` (`timed_part`) keeps, where it cuts them; else None."""
    return part.shape[1] if part.dim() == 2 and part.shape[1] < inputs.shape[1] else None
