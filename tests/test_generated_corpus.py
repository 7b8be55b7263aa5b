"""A generated corpus of bad arguments: every public entry point below x every argument x
each kind of bad value that fits it ({wrong type, out of range, non-finite, empty, huge}).
Each case must end in a `LayerScopeError` (a message in words), or be listed in ACCEPTED
with why the value is fine and what was checked; in every case the base model keeps its
weights, fingerprint and hooks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

from lib.errors import LayerScopeError
from lib.hooks import count_hooks

HUGE_INT = 10**12
HUGE_TEXT = "x = 1\n" * 200_000  # 1.2 MB


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[..., Any]
    valid: Callable[[dict], dict]  # the fixtures -> valid keyword arguments


# what kind of value an argument takes -> the kinds of bad value generated for it
KINDS = {
    "bool": ("wrong type",),
    "int": ("wrong type", "out of range", "huge"),
    "float": ("wrong type", "non-finite", "non-finite", "out of range", "huge"),
    "str": ("wrong type", "empty", "huge"),
    "tokens": ("wrong type", "empty", "out of range", "huge"),
    "floats": ("wrong type", "empty", "non-finite", "huge"),
    "seq": ("wrong type", "empty", "out of range"),
    "object": ("wrong type",),
}


def tag(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float, str)):
        return type(value).__name__
    if isinstance(value, torch.Tensor):
        return "floats" if value.is_floating_point() else "tokens"
    return "seq" if isinstance(value, (tuple, list)) else "object"


def _bad_values(value: Any) -> list[tuple[str, Any]]:
    """(kind, bad value) for one argument, in the order of KINDS[tag(value)]."""
    return {
        "bool": lambda v: [("wrong type", "yes")],
        "int": lambda v: [("wrong type", "3"), ("out of range", -1), ("huge", HUGE_INT)],
        "float": lambda v: [("wrong type", "0.5"), ("non-finite", math.nan), ("non-finite", math.inf),
                            ("out of range", -1.0), ("huge", 1e12)],
        "str": lambda v: [("wrong type", 3), ("empty", ""), ("huge", HUGE_TEXT)],
        "tokens": lambda v: [("wrong type", v.float()), ("empty", v[..., :0]), ("out of range", v + 10**6),
                             ("huge", v.repeat(1, 4096)[..., :100_000])],
        "floats": lambda v: [("wrong type", v.long()), ("empty", v[:0]), ("non-finite", torch.full_like(v, math.nan)),
                             ("huge", v * 1e30)],
        "seq": lambda v: [("wrong type", "ab"), ("empty", type(v)()), ("out of range", type(v)([HUGE_INT]))],
        "object": lambda v: [("wrong type", object())],
    }[tag(value)](value)


def _cases() -> list[Case]:
    from analysis import lens
    from analysis.channels import circuits, heads
    from analysis.compress.exits import inputs as exit_inputs
    from analysis.compress.prune import allocation
    from analysis.interpreter import transformer as it
    from analysis.redundancy import drops, similarity
    from analysis.redundancy import report as rr
    from lib import data, metrics

    return [
        Case("evaluate", metrics.evaluate, lambda f: dict(handle=f["lm"], batch=f["batch"], size_bits=1000,
                                                          latency_repeats=1)),
        Case("text_batch", data.text_batch, lambda f: dict(tokenizer=f["lm"].tokenizer, text=f["text"], seq_len=16,
                                                           max_windows=3)),
        Case("code_batch", data.code_batch, lambda f: dict(tokenizer=f["lm"].tokenizer, seq_len=16, n_windows=3)),
        Case("build_report", rr.build_report, lambda f: dict(handle=f["lm"], batch=f["batch"], skip=2)),
        Case("candidates", rr.candidates, lambda f: dict(report=f["report"], granularity="sublayers", by="measured")),
        Case("collect_residuals", similarity.collect_residuals, lambda f: dict(handle=f["lm"], batch=f["batch"],
                                                                               skip=2, with_logits=True)),
        Case("evaluate_dropped", drops.evaluate_dropped, lambda f: dict(handle=f["lm"], batch=f["batch"],
                                                                        drops=[f["drop"]], base=None)),
        Case("logit_lens", lens.logit_lens, lambda f: dict(handle=f["lm"], res=f["res"])),
        Case("role_probe", heads.role_probe, lambda f: dict(handle=f["lm"], n=2, block=5, copies=3, seed=0)),
        Case("head_roles", heads.head_roles, lambda f: dict(handle=f["lm"], tokens=f["probe"])),
        Case("channels prompt_tokens", heads.prompt_tokens, lambda f: dict(handle=f["lm"], prompt="def f(x):",
                                                                          max_tokens=32)),
        Case("attention_patterns", heads.attention_patterns, lambda f: dict(handle=f["lm"], tokens=f["probe"])),
        Case("composition_scores", circuits.composition_scores, lambda f: dict(c=f["circuits"], modes=("V",))),
        Case("channel_components", circuits.channel_components,
             lambda f: dict(c=f["circuits"], composition=f["composition"], writer=(0, 1), reader=(1, 2), mode="V")),
        Case("logit_target", it.logit_target, lambda f: dict(handle=f["lm"], token=50, versus=51)),
        Case("interpreter prompt_tokens", it.prompt_tokens, lambda f: dict(handle=f["lm"], prompt="def f(x):")),
        Case("token_contributions", it.token_contributions,
             lambda f: dict(handle=f["lm"], tokens=f["prompt"], target=f["target"])),
        Case("distortion_curves", allocation.distortion_curves,
             lambda f: dict(handle=f["lm"], inputs=f["batch"].tokens[:2], n_levels=3, scope="mlp")),
        Case("allocate", allocation.allocate, lambda f: dict(curves=f["curves"], sparsity=0.5, units=50)),
        Case("prompt_exits", exit_inputs.prompt_exits,
             lambda f: dict(handle=f["lm"], prompt="def f(x):", criterion="max_prob", threshold=0.5, lens="logit")),
    ]


# (case, argument, kind) -> why that value is fine, and what checks it
ACCEPTED: dict[tuple[str, str, str], str] = {
    ("text_batch", "text", "huge"): "a long text makes at most max_windows windows (checked: 3 rows)",
    ("code_batch", "n_windows", "huge"): "asks for more windows than the held-out text has: gets them all",
    ("role_probe", "seed", "huge"): "any whole number below 2^63 is a seed",
    ("role_probe", "block", "huge"): "the block is shortened to fit the context and the vocabulary (documented)",
    ("channels prompt_tokens", "max_tokens", "huge"): "a limit above the prompt's length keeps the whole prompt",
    ("text_batch", "max_windows", "huge"): "asks for more windows than the text has: gets them all",
    ("evaluate_dropped", "drops", "empty"): "dropping nothing measures the base model itself",
    ("evaluate", "size_bits", "huge"): "10^12 bits is the size of a 125 GB model: a size, reported as given",
}


# every argument of every case, by the kind of value it takes (ids are made before any fixture exists)
ARGS: dict[str, dict[str, str]] = {
    "evaluate": dict(handle="object", batch="object", size_bits="int", latency_repeats="int"),
    "text_batch": dict(tokenizer="object", text="str", seq_len="int", max_windows="int"),
    "code_batch": dict(tokenizer="object", seq_len="int", n_windows="int"),
    "build_report": dict(handle="object", batch="object", skip="int"),
    "candidates": dict(report="object", granularity="str", by="str"),
    "collect_residuals": dict(handle="object", batch="object", skip="int", with_logits="bool"),
    "evaluate_dropped": dict(handle="object", batch="object", drops="seq"),
    "logit_lens": dict(handle="object", res="object"),
    "role_probe": dict(handle="object", n="int", block="int", copies="int", seed="int"),
    "head_roles": dict(handle="object", tokens="tokens"),
    "channels prompt_tokens": dict(handle="object", prompt="str", max_tokens="int"),
    "attention_patterns": dict(handle="object", tokens="tokens"),
    "composition_scores": dict(c="object", modes="seq"),
    "channel_components": dict(c="object", composition="object", writer="seq", reader="seq", mode="str"),
    "logit_target": dict(handle="object", token="int", versus="int"),
    "interpreter prompt_tokens": dict(handle="object", prompt="str"),
    "token_contributions": dict(handle="object", tokens="tokens", target="object"),
    "distortion_curves": dict(handle="object", inputs="tokens", n_levels="int", scope="str"),
    "allocate": dict(curves="object", sparsity="float", units="int"),
    "prompt_exits": dict(handle="object", prompt="str", criterion="str", threshold="float", lens="str"),
}


def _generated() -> list[tuple[str, str, str, int]]:
    return [(name, arg, kind, i) for name, args in ARGS.items() for arg, t in args.items()
            for i, kind in enumerate(KINDS[t])]


@pytest.fixture(scope="module")
def fixtures(tiny_lm):
    from analysis.channels import circuits, heads
    from analysis.compress.prune import allocation
    from analysis.compress.prune.pruning import Drop
    from analysis.interpreter import transformer as it
    from analysis.interpreter.gradients import working_copy
    from analysis.redundancy import report as rr
    from analysis.redundancy import similarity
    from lib import data

    batch = data.code_batch(tiny_lm.tokenizer, seq_len=16, n_windows=3)
    c = circuits.circuits(tiny_lm)
    return dict(lm=tiny_lm, batch=batch, text="def f(x):\n    return x\n" * 20,
                report=rr.build_report(tiny_lm, batch, skip=2), res=similarity.collect_residuals(tiny_lm, batch, 2),
                circuits=c, composition=circuits.composition_scores(c), drop=Drop("mlp", 1),
                probe=heads.role_probe(tiny_lm, n=2, block=5), prompt=it.prompt_tokens(tiny_lm, "def f(x):"),
                target=it.logit_target(tiny_lm, 50),
                curves=allocation.distortion_curves(tiny_lm, batch.tokens[:2], n_levels=3, scope="mlp"),
                copy=working_copy(tiny_lm))


@pytest.mark.parametrize("name, arg, kind, index", _generated(), ids=lambda v: str(v).replace(" ", "_"))
def test_a_bad_argument_is_refused_in_words(name, arg, kind, index, fixtures):
    from conftest import in_thread

    case = next(c for c in _cases() if c.name == name)
    kwargs = case.valid(fixtures)
    assert set(ARGS[name]) <= set(kwargs) and tag(kwargs[arg]) == ARGS[name][arg]  # the table fits the calls
    if name == "token_contributions":
        kwargs["handle"] = fixtures["copy"]  # gradients run on a private float64 copy, as the page does
    made, kwargs[arg] = _bad_values(kwargs[arg])[index]
    assert made == kind  # the id names the value tried
    lm = fixtures["lm"]
    before = (lm.current_fingerprint(), count_hooks(lm.model))
    outcome = in_thread(lambda: case.call(**kwargs), timeout=120)
    assert (lm.current_fingerprint(), count_hooks(lm.model)) == before, "the base model changed"
    if (name, arg, kind) in ACCEPTED and not isinstance(outcome, Exception):
        return
    assert isinstance(outcome, LayerScopeError), f"{name}({arg}={kind}): {type(outcome).__name__} {outcome!r}"[:400]


def test_every_case_and_argument_is_in_the_table():
    import inspect

    for case in _cases():
        bookkeeping = {"progress", "so_far", "dtype", "base", "source", "vocabulary"}
        params = set(inspect.signature(case.call).parameters) - bookkeeping
        assert params == set(ARGS[case.name]), case.name
    assert {k for _, _, k, _ in _generated()} == {"wrong type", "out of range", "non-finite", "empty", "huge"}
