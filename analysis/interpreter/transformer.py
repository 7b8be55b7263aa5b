"""The detached linearisation of a transformer language model (METHODS.md §3).

With every LayerNorm / RMSNorm scale, attention pattern (or the queries and keys it is
computed from) and MLP gate frozen at its value for a prompt (a plain MLP's g = act(p)/p;
a gated MLP's gate branch act(x·W_gate), so act(x·W_gate) ⊙ x·W_up is linear in x), a
target logit at the last position is exactly linear in the input embeddings plus a bias
term: logit = sum over positions of J_pos · e_pos + b. One pass with the frozen parts
detached gives the value and, with one backward, J; a second pass at zero embeddings gives
b, so the reconstruction error |sum + b - logit| is a real check that nothing was left
unfrozen. Gradients and float64 run on a private copy (`gradients.working_copy`); the
shared base model is never hooked for gradients and stays bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from analysis.interpreter.gradients import InterpreterError, gradient_model
from lib.data import MAX_PROMPT_CHARS, DataError, check_text
from lib.handle import ModelHandle, Point, check_handle

NOT_LINEAR_READOUT = ("This model's readout is not a plain linear unembedding (e.g. soft-capped logits, as in "
                      "Gemma 2), so its logits are not linear in the final norm's output and the interpreter "
                      "cannot decompose them exactly. Pick a model with a linear readout (GPT-2, Pythia, Llama, "
                      "Qwen, Gemma 1) for this page; the other pages work on this one.")


def check_linearisable(handle: ModelHandle) -> None:
    """Refuse, before any float64 copy is made, a model the detached linearisation cannot
    make exact (CapabilityError / InterpreterError saying why and what to pick instead)."""
    handle.gates.points()
    if handle.blocks.unembedding() is None:
        raise InterpreterError(NOT_LINEAR_READOUT)


@dataclass(frozen=True)
class LogitTarget:
    """What to explain at the last position: sum_i weights[i] · logit[token_ids[i]] — one
    token's logit (weights (1,)) or the difference of two ((1, -1)). label: as shown."""

    token_ids: tuple[int, ...]
    weights: tuple[float, ...]
    label: str


def logit_target(handle: ModelHandle, token: int, versus: int | None = None) -> LogitTarget:
    """The logit of `token`, or the logit difference `token` - `versus` (token ids)."""
    check_handle(handle)
    vocab = handle.structure.d_vocab
    for t in (token, versus):
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab):
            raise DataError(f"A target token is an id in 0..{vocab - 1}; got {t!r}.")
    name = shown_token(token_text(handle, token))
    if versus is None:
        return LogitTarget((token,), (1.0,), f"logit of “{name}”")
    if versus == token:
        raise DataError("A logit difference needs two different tokens.")
    return LogitTarget((token, versus), (1.0, -1.0),
                       f"logit “{name}” − logit “{shown_token(token_text(handle, versus))}”")


def token_text(handle: ModelHandle, token: int) -> str:
    return handle.tokenizer.decode([token], clean_up_tokenization_spaces=False)


_WHITESPACE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "\\r"}  # as analysis.plots marks them, without colour


def shown_token(text: str, limit: int = 0) -> str:
    """A token as plain text with its whitespace visible ("␣def"), cut to `limit`
    characters with "…" when `limit` is set; the empty token is "∅"."""
    shown = "".join(_WHITESPACE.get(c, c) for c in text) or "∅"
    return shown if not limit or len(shown) <= limit else shown[: limit - 1] + "…"


def prompt_tokens(handle: ModelHandle, prompt: str) -> torch.Tensor:
    """The prompt as the model reads it, [1, pos]: BOS first (when the tokenizer has one),
    the oldest tokens dropped if it is longer than the context."""
    check_handle(handle)
    if handle.kind != "causal-lm":
        raise DataError("Prompts are for language models; this is an image model.")
    check_text(prompt, "prompt", MAX_PROMPT_CHARS)
    if not prompt.strip():
        raise DataError("The prompt is empty. Type some text to see how the model reads it.")
    tok = handle.tokenizer
    ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    bos = tok.bos_token_id
    room = handle.structure.n_ctx - (1 if bos is not None else 0)
    ids = ([bos] if bos is not None else []) + ids[max(0, len(ids) - room):]
    if not ids:
        raise DataError("The tokenizer turned the prompt into no tokens at all; try other text.")
    return torch.tensor([ids])


@dataclass(frozen=True)
class TokenContributions:
    """The detached linearisation of a causal LM on one prompt, for one target at its last
    position.

    tokens: [pos] the ids fed (BOS first when the tokenizer has one); texts: their text;
    target: what is explained; token_part: [pos] J_pos · (token embedding at pos);
    position_part: [pos] J_pos · (position embedding at pos), zeros for models without
    learned positions (has_positions False); bias: b, the frozen model's target value at
    zero input embeddings (every bias term it carries); value: F(x0), the model's real
    target value; error: |sum(token_part + position_part) + b - F(x0)|; n_frozen: how many
    scales, patterns and gates were frozen; frozen: (what, how many) for each kind frozen.
    """

    tokens: torch.Tensor
    texts: tuple[str, ...]
    target: LogitTarget
    token_part: torch.Tensor
    position_part: torch.Tensor
    bias: float
    value: float
    error: float
    n_frozen: int
    has_positions: bool
    frozen: tuple[tuple[str, int], ...] = ()

    @property
    def contributions(self) -> torch.Tensor:
        """[pos] each position's exact contribution (token + position embedding)."""
        return self.token_part + self.position_part


@dataclass(frozen=True)
class FrozenLM:
    """A causal LM's nonlinear points frozen at their values for one prompt.

    tokens: [1, pos]; points: `handle.gates.points()`; values: point -> its
    frozen value [1, ...] (a LayerNorm scale, an attention pattern, or for an MLP
    activation point the gate act(p)/p); embeddings: input point -> its value at the
    prompt [1, pos, d_model].
    """

    tokens: torch.Tensor
    points: dict[str, list[Point]]
    values: dict[Point, torch.Tensor] = field(repr=False)
    embeddings: dict[Point, torch.Tensor] = field(repr=False)

    @property
    def n_frozen(self) -> int:
        return sum(n for _, n in self.frozen_counts())

    def frozen_counts(self) -> tuple[tuple[str, int], ...]:
        """(what, how many) for each kind of point frozen, in words."""
        p = self.points
        counts = (("norm scales", len(p["scale"])), ("attention patterns", len(p["pattern"])),
                  ("attention patterns (via their queries and keys)", len(p["query_key"]) // 2),
                  ("MLP gates act(p)/p", len(p["gate_out"])),
                  ("gated-MLP gate branches act(x·W_gate)", len(p["gate_branch"])))
        return tuple((what, n) for what, n in counts if n)

    @property
    def x0(self) -> torch.Tensor:
        """[1, pos, d_model] the summed input embeddings (the residual stream entering block 0)."""
        return sum(self.embeddings.values())


def _readout(model: ModelHandle, target: LogitTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """(direction [d_model], offset []) with target = LN_final(h) · direction + offset."""
    found = model.blocks.unembedding()
    if found is None:
        raise InterpreterError(NOT_LINEAR_READOUT)
    w_u, b_u = found
    ids, weights = list(target.token_ids), torch.tensor(target.weights, dtype=w_u.dtype)
    direction = weights @ w_u[ids]
    offset = weights @ b_u[ids] if b_u is not None else torch.zeros((), dtype=w_u.dtype)
    return direction.detach(), offset.detach()


def _feeding(points: list[Point], values: list[torch.Tensor]) -> list[tuple[Point, Callable]]:
    """Hooks that replace each input embedding by the given tensor."""
    return [(p, (lambda v: lambda _t: v)(v)) for p, v in zip(points, values)]


def _detaching(points: dict[str, list[Point]], kept: dict[Point, torch.Tensor]) -> list[tuple[Point, Callable]]:
    """Hooks for the pass at the prompt: each scale, pattern and gate keeps its value but
    passes no gradient (the gate: act(p) in value, g · dp in gradient); what is frozen is
    kept in `kept`."""
    live: dict[int, torch.Tensor] = {}

    def constant(p: Point) -> Callable:
        def hook(t: torch.Tensor) -> torch.Tensor:
            kept[p] = t.detach()
            return t.detach()
        return hook

    def pre(i: int) -> Callable:
        def hook(t: torch.Tensor) -> None:
            live[i] = t
        return hook

    def gate(i: int, p: Point) -> Callable:
        def hook(t: torch.Tensor) -> torch.Tensor:
            x = live[i]
            g = _gate(t.detach(), x.detach())
            kept[p] = g
            return t.detach() + (x - x.detach()) * g  # value exactly act(p); derivative g
        return hook

    pairs = [(p, constant(p)) for p in _constants(points)]
    for i, (p_in, p_out) in enumerate(zip(points["gate_in"], points["gate_out"])):
        pairs += [(p_in, pre(i)), (p_out, gate(i, p_out))]
    return pairs


def _constants(points: dict[str, list[Point]]) -> list[Point]:
    """The points frozen outright at their value for the prompt."""
    return points["scale"] + points["pattern"] + points["query_key"] + points["gate_branch"]


def _gate(activation: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """g = act(p)/p, and 0 where p = 0 (there act(p) = 0 for ReLU and GELU alike)."""
    return torch.where(pre != 0, activation / torch.where(pre != 0, pre, 1), 0)


def _replaying(frozen: FrozenLM) -> list[tuple[Point, Callable]]:
    """Hooks that run the model frozen at the prompt, for inputs of any batch size:
    scales and patterns replaced by their values, each MLP activation by p · g."""
    live: dict[int, torch.Tensor] = {}

    def constant(p: Point) -> Callable:
        return lambda t: frozen.values[p].expand_as(t)

    def pre(i: int) -> Callable:
        def hook(t: torch.Tensor) -> None:
            live[i] = t
        return hook

    def gate(i: int, p: Point) -> Callable:
        return lambda _t: live[i] * frozen.values[p]

    points = frozen.points
    pairs = [(p, constant(p)) for p in _constants(points)]
    for i, (p_in, p_out) in enumerate(zip(points["gate_in"], points["gate_out"])):
        pairs += [(p_in, pre(i)), (p_out, gate(i, p_out))]
    return pairs


def _check_tokens(handle: ModelHandle, tokens: torch.Tensor) -> torch.Tensor:
    check_handle(handle)
    if handle.kind != "causal-lm":
        raise InterpreterError("The detached linearisation is for language models; use linear_map for an image.")
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() not in (1, 2) \
            or (tokens.dim() == 2 and tokens.shape[0] != 1) or tokens.numel() == 0:
        raise DataError("The linear interpreter reads one prompt: int64 token ids [pos] or [1, pos].")
    tokens = tokens.view(1, -1)
    n_ctx, vocab = handle.structure.n_ctx, handle.structure.d_vocab
    if tokens.shape[1] > n_ctx or int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise DataError(f"The prompt must be at most {n_ctx} tokens with ids in 0..{vocab - 1}.")
    return tokens


def linearise_lm(handle: ModelHandle, tokens: torch.Tensor, target: LogitTarget,
                 dtype: torch.dtype = torch.float64) -> tuple[TokenContributions, FrozenLM]:
    """The exact per-token contributions to `target` at the last position of `tokens`
    [pos] or [1, pos], and the frozen state they were computed in.

    Two passes on a private copy in `dtype` (or on `handle` if it already is one): one at
    the prompt with every nonlinear point detached (value F(x0) and, by one backward, J),
    one at zero input embeddings with the same frozen values (the bias b).
    """
    tokens = _check_tokens(handle, tokens)
    if not isinstance(target, LogitTarget):
        raise DataError(f"The target is a LogitTarget from logit_target(handle, token), not a {type(target).__name__}.")
    model = gradient_model(handle, dtype)
    points = model.gates.points()
    inputs = points["inputs"]
    embeds = model.record(tokens, inputs)
    if len(embeds) != len(inputs):
        raise InterpreterError("The model's input embeddings could not be recorded.")
    leaves = [embeds[p].detach().clone().requires_grad_(True) for p in inputs]
    direction, offset = _readout(model, target)
    kept: dict[Point, torch.Tensor] = {}
    with torch.enable_grad(), model.hooks(_feeding(inputs, leaves) + _detaching(points, kept)):
        value = model.gates.unembedding_input(tokens)[0, -1] @ direction + offset
        grads = torch.autograd.grad(value, leaves)
    parts = [(g * e).sum(-1)[0].detach() for g, e in zip(grads, leaves)]  # [pos] each
    unfrozen = [p for p in _constants(points) + points["gate_out"] if p not in kept]
    if unfrozen:
        raise InterpreterError(f"{len(unfrozen)} point(s) to freeze never fired in this model's forward "
                               f"(first: {unfrozen[0].site} {unfrozen[0].layer}); it cannot be linearised exactly.")
    frozen = FrozenLM(tokens, points, kept, {p: e.detach() for p, e in zip(inputs, leaves)})
    with torch.no_grad(), model.hooks(_feeding(inputs, [torch.zeros_like(e) for e in leaves]) + _replaying(frozen)):
        bias = model.gates.unembedding_input(tokens)[0, -1] @ direction + offset
    position = parts[1] if len(parts) > 1 else torch.zeros_like(parts[0])
    error = float((parts[0].sum() + position.sum() + bias - value.detach()).abs())
    bos = handle.tokenizer.bos_token_id
    texts = tuple("BOS" if i == 0 and int(t) == bos else token_text(handle, int(t))  # as the Channels page names it
                  for i, t in enumerate(tokens[0]))
    result = TokenContributions(tokens[0], texts, target, parts[0], position, float(bias), float(value.detach()),
                                error, frozen.n_frozen, len(parts) > 1, frozen.frozen_counts())
    return result, frozen


def token_contributions(handle: ModelHandle, tokens: torch.Tensor, target: LogitTarget,
                        dtype: torch.dtype = torch.float64) -> TokenContributions:
    """`linearise_lm` without the frozen state."""
    return linearise_lm(handle, tokens, target, dtype)[0]


def input_embeddings(model: ModelHandle, tokens: torch.Tensor) -> torch.Tensor:
    """[1, pos, d_model] the prompt's summed input embeddings (token + position): the x of
    `target_function`."""
    tokens = _check_tokens(model, tokens)
    inputs = model.gates.points()["inputs"]
    return sum(model.record(tokens, inputs).values())


def target_function(model: ModelHandle, tokens: torch.Tensor, target: LogitTarget,
                    frozen: FrozenLM | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """f(x) -> [batch]: the target at the last position as a function of the summed input
    embeddings x [batch, pos, d_model] (the residual stream entering block 0), differentiable,
    on the real model or, given `frozen`, on the model frozen at its prompt (then exactly
    affine in x). `model` is a private copy (`working_copy`)."""
    tokens = _check_tokens(model, tokens)
    points = model.gates.points()
    inputs = points["inputs"]
    direction, offset = _readout(model, target)

    def f(x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        feeds = _feeding(inputs, [x] + [torch.zeros_like(x)] * (len(inputs) - 1))
        with torch.enable_grad(), model.hooks(feeds + (_replaying(frozen) if frozen is not None else [])):
            h = model.gates.unembedding_input(tokens.expand(batch, -1))
            return h[:, -1] @ direction + offset

    return f
