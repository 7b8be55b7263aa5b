"""captum's attributions beside the exact linear contributions of `relu` and `transformer`.

Each method runs on the real (unfrozen) model, on the same input and target as the exact
decomposition, and is compared with it by Pearson correlation over input pixels (image
models) or prompt positions (language models). For a ReLU network InputXGradient is
exactly the vote map x0 ⊙ A_k (its sum is F(x0) - b: the completeness gap is the bias);
IntegratedGradients and DeepLift sum to F(x0) - F(0), a different linear region's answer;
Saliency is unsigned, so it is compared with the absolute exact contributions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from analysis.interpreter.gradients import gradient_model, no_progress
from analysis.interpreter.relu import LinearMap, output_labels
from analysis.interpreter.transformer import LogitTarget, TokenContributions, input_embeddings, target_function
from lib.handle import ModelHandle
from lib.progress import Progress

DEFAULT_STEPS = 32
DEEPLIFT_LM = "its rules cover ReLU-type layers, not attention, LayerNorm or GELU."


@dataclass(frozen=True)
class Attribution:
    """One captum method's attribution to the target.

    values: shaped like the exact contributions ([C, H, W] per input pixel, or [pos] per
    prompt position, summed over the embedding dimension); total: their sum;
    correlation: Pearson r with the exact contributions (with their absolute values when
    `unsigned`: Saliency is |gradient|); nan when either side is constant.
    """

    method: str
    values: torch.Tensor
    total: float
    correlation: float
    unsigned: bool = False


@dataclass(frozen=True)
class AttributionComparison:
    """captum's methods against the exact linear contributions for one input and target.

    target: what is explained, as shown; kind: the model's kind ("causal-lm", ...);
    exact: the exact contributions (the vote map x0 ⊙ A_k [C, H, W], or per-position
    contributions [pos]); value: F(x0), the real model's target; exact_total: the exact
    contributions' sum, F(x0) - b; zero_input_value: F(0), the real model's target at a
    zero input (what IntegratedGradients and DeepLift explain the difference from);
    methods: one Attribution each; not_applicable: (method, why) pairs.
    """

    target: str
    kind: str
    exact: torch.Tensor
    value: float
    exact_total: float
    zero_input_value: float
    methods: tuple[Attribution, ...]
    not_applicable: tuple[tuple[str, str], ...] = ()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors flattened, in [-1, 1]; nan when either is constant.
    Clamped: for proportional tensors round-off gives 1.0000000000000002."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return min(max(float(a @ b / denom), -1.0), 1.0) if denom > 0 else float("nan")


def _attribution(method: str, values: torch.Tensor, exact: torch.Tensor, unsigned: bool = False) -> Attribution:
    values = values.detach()
    return Attribution(method, values, float(values.sum()), pearson(values, exact.abs() if unsigned else exact),
                       unsigned)


def _gradient_methods(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n_steps: int,
                      progress: Progress) -> dict[str, torch.Tensor]:
    """Saliency (|∇f|), InputXGradient (x ⊙ ∇f) and IntegratedGradients (from a zero
    baseline) of a scalar-per-row function f at x [1, ...]: each [1, ...]."""
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    progress(0.1, "saliency")
    out = {"Saliency": Saliency(f).attribute(x, abs=True)}
    progress(0.3, "input × gradient")
    out["InputXGradient"] = InputXGradient(f).attribute(x)
    progress(0.5, f"integrated gradients ({n_steps} steps)")
    out["IntegratedGradients"] = IntegratedGradients(f).attribute(x, baselines=torch.zeros_like(x), n_steps=n_steps,
                                                                   internal_batch_size=n_steps)
    return out


class _Flat(nn.Module):
    """A network with its outputs flattened to [batch, K], so one index names any output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


def image_attributions(handle: ModelHandle, linear: LinearMap, target: int, n_steps: int = DEFAULT_STEPS,
                       dtype: torch.dtype = torch.float64, progress: Progress | None = None) -> AttributionComparison:
    """Saliency, InputXGradient, IntegratedGradients and DeepLift for output `target` of an
    image model at `linear.x0`, beside the exact vote map x0 ⊙ A_target."""
    from captum.attr import DeepLift

    progress = progress or no_progress
    if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < linear.n_outputs:
        from lib.data import DataError
        raise DataError(f"The target is an output index in 0..{linear.n_outputs - 1}; got {target!r}.")
    model = gradient_model(handle, dtype)
    x = linear.x0.unsqueeze(0).clone()
    exact = linear.votes(target)
    f = lambda z: model.gates.differentiable_forward(z).flatten(1)[:, target]  # noqa: E731
    found = _gradient_methods(f, x, n_steps, progress)
    progress(0.8, "DeepLift")
    with model.lock, warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")  # captum announces the hooks it sets on every ReLU
        net = _Flat(model.gates.attribution_module())
        found["DeepLift"] = DeepLift(net).attribute(x.to(linear.output.dtype), baselines=torch.zeros_like(x),
                                                    target=target)
    progress(1.0, "done")
    methods = tuple(_attribution(name, values[0], exact, unsigned=name == "Saliency") for name, values in found.items())
    label = output_labels(linear)[target]
    zero = float(f(torch.zeros_like(x)))
    return AttributionComparison(label, handle.kind, exact, float(linear.output[target]),
                                 float(linear.input_part[target]), zero, methods)


def token_attributions(handle: ModelHandle, exact: TokenContributions, n_steps: int = DEFAULT_STEPS,
                       dtype: torch.dtype = torch.float64, progress: Progress | None = None) -> AttributionComparison:
    """Saliency, InputXGradient and IntegratedGradients of the target of `exact` with
    respect to the prompt's input embeddings (token + position, summed), per position,
    beside the exact contributions. DeepLift does not apply to a transformer."""
    progress = progress or no_progress
    model = gradient_model(handle, dtype)
    tokens = exact.tokens.view(1, -1)
    target: LogitTarget = exact.target
    f = target_function(model, tokens, target)
    x = input_embeddings(model, tokens)
    found = _gradient_methods(f, x, n_steps, progress)
    progress(1.0, "done")
    methods = tuple(_attribution(name, values[0].sum(-1), exact.contributions, unsigned=name == "Saliency")
                    for name, values in found.items())
    total, zero = float(exact.contributions.sum()), float(f(torch.zeros_like(x)))
    return AttributionComparison(target.label, handle.kind, exact.contributions, exact.value, total, zero, methods,
                                 (("DeepLift", DEEPLIFT_LM),))
