"""What the Interpreter page says about one input: sentences and table rows built from the
numbers of the interpreter's results, so a caption never claims what the model in
front of the user does not show."""

from __future__ import annotations

from collections import Counter

from analysis.interpreter.attributions import AttributionComparison
from analysis.interpreter.relu import LinearMap
from analysis.interpreter.transformer import TokenContributions, shown_token


def reconstruction_sentence(error: float, dtype_bits: int = 64) -> str:
    """How exact the decomposition is, against the round-off of the precision it ran in."""
    eps = 2.2e-16 if dtype_bits == 64 else 1.2e-7
    verdict = "exact up to round-off" if error < 1e-6 else "NOT exact: some nonlinearity was left live"
    return (f"Reconstruction error {error:.2g} (float{dtype_bits}, whose round-off is about {eps:.1g} per "
            f"operation): the decomposition is {verdict}.")


def lm_frozen_sentence(result: TokenContributions) -> str:
    """What the transformer linearisation froze at this prompt, e.g. "Frozen at this prompt:
    7 norm scales, 3 attention patterns and 3 gated-MLP gate branches act(x·W_gate)"."""
    parts = [f"{n} {what}" for what, n in result.frozen]
    if not parts:
        return "Nothing was frozen: the model is linear in its input embeddings."
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    positions = "" if result.has_positions else (" This model has no position embedding at its input: positions act "
                                                  "inside attention, whose patterns are frozen.")
    return f"Frozen at this prompt: {listed}.{positions}"


def frozen_sentence(linear: LinearMap) -> str:
    """Which layers were frozen, e.g. "4 ReLU and 2 MaxPool2d layers"."""
    counts = Counter(kind for _, kind in linear.frozen)
    parts = [f"{n} {kind}" for kind, n in counts.items()]
    listed = " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)
    noun = "layer" if len(linear.frozen) == 1 else "layers"
    return f"Frozen at this input: {listed} {noun}." if listed else "Nothing to freeze: the network is affine."


def bias_sentence(linear: LinearMap, labels: list[str], k: int) -> str:
    """How much of output k comes from the pixels and how much from the bias."""
    part, bias, out = float(linear.input_part[k]), float(linear.bias[k]), float(linear.output[k])
    text = f"{labels[k].capitalize()}: the input contributes {part:+.3g}, the bias {bias:+.3g}, together F = {out:+.3g}"
    if abs(out) < 1e-9:
        return text + " (the bias share b/F is undefined at F = 0)."
    shares = linear.bias_share
    sizable = shares[linear.output.abs() >= 0.1 * linear.output.abs().max()]  # b/F explodes as F nears 0
    return (text + f", so the bias alone accounts for {_percent(float(shares[k]))} of it. Over the outputs at least "
            f"a tenth the size of the largest, the bias share runs from {_percent(float(sizable.min()))} to "
            f"{_percent(float(sizable.max()))}.")


def _percent(share: float) -> str:
    """0.523 -> "52%", 0.0004 -> "0.04%" (no "-0%" for a small share)."""
    return f"{share:.0%}" if abs(share) >= 0.01 else f"{share:.2%}"


def attribution_rows(comparison: AttributionComparison) -> dict[str, list[str]]:
    """A table: each captum method's sum and correlation with the exact contributions,
    beside what its sum should be (with the number, so a gap shows)."""
    gap = f"F(x0) − F(0) = {comparison.value - comparison.zero_input_value:+.4g}"
    relu = comparison.kind != "causal-lm"
    expected = {"Saliency": "no sum rule (unsigned: |gradient|)",
                "InputXGradient": f"F(x0) − b = {comparison.exact_total:+.4g} (for a ReLU network the gradient is A)"
                if relu else "no sum rule (the real gradient is not the frozen one)",
                "IntegratedGradients": gap + " up to its path integral's error",
                "DeepLift": gap + " where its rules hold"}
    rows: dict[str, list[str]] = {"method": [], "sum": [], "correlation with exact": [], "its sum should be": []}

    def add(method: str, total: str, r: str, should: str) -> None:
        for column, cell in zip(rows, (method, total, r, should)):
            rows[column].append(cell)

    add("exact (x0 ⊙ A, or J · e)", f"{comparison.exact_total:+.4g}", "1", f"F(x0) − b = {comparison.exact_total:+.4g}")
    for m in comparison.methods:
        r = "–" if m.correlation != m.correlation else f"{m.correlation:.3f}" + (" (vs |exact|)" if m.unsigned else "")
        should = expected.get(m.method, "")
        if m.method == "IntegratedGradients":  # how far off the finite-step path integral is, not only that it may be
            miss = m.total - (comparison.value - comparison.zero_input_value)
            should = gap + f"; its path integral misses by {miss:+.3g} here" + (
                " (LayerNorm bends sharply near the zero input, so finite steps miss much)"
                if not relu and abs(miss) > 0.1 * abs(comparison.value - comparison.zero_input_value) else "")
        add(m.method, f"{m.total:+.4g}", r, should)
    for method, why in comparison.not_applicable:
        add(method, "–", "–", "not applicable: " + why)
    return rows


def zero_sentence(comparison: AttributionComparison) -> str:
    """What IntegratedGradients and DeepLift explain: the difference from the zero input."""
    return (f"At an all-zero input the model gives {comparison.zero_input_value:+.4g}, so methods with a zero baseline "
            f"explain F(x0) − F(0) = {comparison.value - comparison.zero_input_value:+.4g}; the exact decomposition "
            f"explains F(x0) − b = {comparison.exact_total:+.4g} (b is this input's region's bias, not F(0)).")


def token_sentence(result: TokenContributions, top: int = 3) -> str:
    """The largest contributions by size, and how they add up."""
    c = result.contributions
    order = c.abs().argsort(descending=True)[:top].tolist()
    named = ", ".join(f"“{shown_token(result.texts[i])}” at {i} ({float(c[i]):+.3g})" for i in order)
    plus = "−" if result.bias < 0 else "+"  # the operator carries the bias's sign: "+ 5.155", never "+ +5.155"
    return (f"The {result.target.label} is {result.value:+.4g} = {float(c.sum()):+.4g} from the {len(c)} positions "
            f"{plus} {abs(result.bias):.4g} bias. Largest contributions: {named}.")
