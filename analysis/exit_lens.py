"""Readouts for early exits (METHODS.md §6): how the state at an intermediate depth
becomes class logits.

- "logit": the logit lens of a language model, final LayerNorm + unembedding applied to
  h_l itself (METHODS §1); no parameters.
- "tuned": a tuned lens, one affine translator per depth, logits_l = W_U (A_l LN(h_l) + b_l)
  + b_U, trained on the evaluation set's training part to minimise KL(p_L || p_l). The
  translator sits after the final LayerNorm (Belrose et al. 2023 put theirs before it), so
  the LayerNorm needs no gradient and the readout stays one affine map. Fitted in two
  steps: least squares from LN(h_l) to the final layer's normalised state (recovered from
  the logits), then Adam steps on the KL itself as far as a FLOP budget allows.
- "heads": for image classifiers, a linear head per exit stage on the stage's globally
  average-pooled features, trained by cross-entropy on the training digits.

Depth l means "after l layers": the state read at depth l is the input of layer l
(`ModelHandle.exit_states`); depth n_layers is the model's own output.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lib import data
from lib.errors import AnalysisError, CapabilityError
from lib.handle import ModelHandle

Progress = Callable[[float, str], None]
LENSES = ("logit", "tuned", "heads")
LENS_LABELS = {"logit": "logit lens", "tuned": "tuned lens", "heads": "exit heads"}

TRAIN_TOKENS = 8192  # tokens (LMs) the tuned lens is fitted on, fewer for large vocabularies
TRAIN_FLOPS = 2e11  # budget of the KL refinement: a few seconds of CPU on zoo:code-lm
TRAIN_STEPS = 150  # at most this many Adam steps
BATCH_TOKENS = 512
MEMORY_LOGITS = 1 << 26  # at most this many floats of final-layer logits (256 MB) held for training
_CACHE_SIZE = 4


class ExitError(AnalysisError):
    """The model or its data cannot be read out early this way; the message says why."""


@dataclass(frozen=True, eq=False)
class ExitLens:
    """How each exit depth's state is read out.

    kind: one of `LENSES`; weight / bias: depth -> the tuned lens' translator [d_model,
    d_model] and [d_model], or the exit head [classes, channels] and [classes]; empty for
    the logit lens. fingerprint: the model the parameters were trained on ('' for none);
    fit_kl: for a tuned lens, mean KL(p_L || p_l) [n_layers] on its training tokens after
    training (nats).
    """

    kind: str
    weight: dict[int, torch.Tensor] = field(default_factory=dict)
    bias: dict[int, torch.Tensor] = field(default_factory=dict)
    fingerprint: str = ""
    fit_kl: tuple[float, ...] = ()

    def __repr__(self) -> str:
        return f"ExitLens({self.kind!r}, depths={sorted(self.weight)}, fingerprint={self.fingerprint!r})"


LOGIT_LENS = ExitLens("logit")


def exit_depths(handle: ModelHandle) -> tuple[int, ...]:
    """The depths where an exit is checked: for an LM after every block but the last
    (1..L-1); for a classifier after every stage with weights but the last (pooling and
    flattening stages add nothing a head could use)."""
    if handle.kind == "causal-lm":
        return tuple(range(1, handle.structure.n_layers))
    if handle.kind == "image-classifier":
        names = [name for name, _ in handle.structure.stages]
        weighted = {handle.place(layer)[0] for layer in handle.linear_layers()}
        return tuple(k for k in range(1, len(names)) if names[k - 1] in weighted)
    return ()


def lens_choices(handle: ModelHandle) -> tuple[str, ...]:
    """The lenses this model can exit through: LMs the logit lens and, with an affine
    unembedding, the tuned lens; classifiers their exit heads; other models none."""
    if handle.kind == "causal-lm":
        return ("logit", "tuned") if handle.unembedding() is not None else ("logit",)
    return ("heads",) if handle.kind == "image-classifier" else ()


def check_exits(handle: ModelHandle, lens: str) -> None:
    """Refuse a model that cannot exit early, or a lens it cannot use, with what to do."""
    if handle.kind not in ("causal-lm", "image-classifier"):
        raise ExitError(f"Early exits need a language model or a classifier; this is an {handle.kind} model, "
                        "whose output is an image, with nothing to read out at an earlier layer.")
    if not exit_depths(handle):
        raise ExitError("This model has no layer before its last one to exit at.")
    choices = lens_choices(handle)
    if lens not in choices:
        if handle.kind == "image-classifier":
            why = "a classifier exits through its trained linear heads"
        elif lens == "tuned":
            why = "the tuned lens needs an affine unembedding, which this model does not have"
        else:
            why = "a language model exits through the logit lens or a tuned lens"
        raise ExitError(f"This model cannot exit through lens {lens!r}: {why}. Choose {' or '.join(choices)}.")


# ---------------------------------------------------------------------- reading out


def pooled(state: torch.Tensor) -> torch.Tensor:
    """Global average pooling: [n, C, H, W] -> [n, C]; [n, F] stays."""
    return state.float().mean(dim=tuple(range(2, state.dim()))) if state.dim() > 2 else state.float()


class Reader:
    """Turns the states of one pass into logits through a lens (float32)."""

    def __init__(self, handle: ModelHandle, lens: ExitLens) -> None:
        self.handle, self.lens = handle, lens
        self.unembed = None
        if lens.kind != "heads":
            affine = handle.unembedding()
            if affine is not None:
                weight, bias = affine
                self.unembed = (weight.float(), None if bias is None else bias.float())
            elif lens.kind == "tuned":
                raise CapabilityError("A tuned lens needs an affine unembedding; this model's readout is not one.")

    def affine(self, depth: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(x [N, k], weight [classes, k], bias [classes] or None) with logits = x weight^T +
        bias for states [N, ...] at `depth`; None when the readout is not affine."""
        lens = self.lens
        if lens.kind == "heads":
            return pooled(state), lens.weight[depth], lens.bias[depth]
        if self.unembed is None:
            return None
        x = self.handle.final_norm(state).float()  # [N, d]
        if lens.kind == "tuned" and depth in lens.weight:
            x = torch.addmm(lens.bias[depth], x, lens.weight[depth].T)
        return x, *self.unembed

    def logits(self, depth: int, state: torch.Tensor) -> torch.Tensor:
        """Logits [N, classes] of states [N, ...] read at `depth`."""
        parts = self.affine(depth, state)
        if parts is None:
            return self.handle.readout(state).float()
        x, weight, bias = parts
        return x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)


# ---------------------------------------------------------------------- trained lenses

_TRAINED: OrderedDict[tuple[str, str], ExitLens] = OrderedDict()
_TRAINED_LOCK = threading.Lock()


def has_trained(handle: ModelHandle, kind: str) -> bool:
    """Whether a trained lens of `kind` for this model's weights is already at hand."""
    with _TRAINED_LOCK:
        return (handle.fingerprint, kind) in _TRAINED


def exit_lens(handle: ModelHandle, lens: str | ExitLens, progress: Progress | None = None) -> ExitLens:
    """The lens `lens` names for this model: the logit lens, or a tuned lens / exit heads
    trained on first use and kept per model fingerprint (the last few models). An
    `ExitLens` given itself is used as it is."""
    if isinstance(lens, ExitLens):
        check_exits(handle, lens.kind)
        return lens
    check_exits(handle, lens)
    if lens == "logit":
        return LOGIT_LENS
    with _TRAINED_LOCK:
        if (handle.fingerprint, lens) in _TRAINED:
            _TRAINED.move_to_end((handle.fingerprint, lens))
            return _TRAINED[(handle.fingerprint, lens)]
    trained = train_tuned_lens(handle, progress) if lens == "tuned" else train_exit_heads(handle, progress)
    remember_lens(handle, trained)
    return trained


def remember_lens(handle: ModelHandle, lens: ExitLens) -> None:
    """Keep a trained lens for this model's weights, where `exit_lens` (and so the
    early-exit edit) finds it: e.g. one a page trained with its own progress bar and
    cached itself."""
    check_exits(handle, lens.kind)
    with _TRAINED_LOCK:
        _TRAINED[(handle.fingerprint, lens.kind)] = lens
        _TRAINED.move_to_end((handle.fingerprint, lens.kind))
        while len(_TRAINED) > _CACHE_SIZE:
            _TRAINED.popitem(last=False)


def training_tokens(handle: ModelHandle, n_tokens: int = TRAIN_TOKENS) -> torch.Tensor:
    """Token windows [n, seq] from the evaluation set's training part: for text, the
    standard-library files the held-out batch does not use (a slice of 64 of them, spread
    over the list); for the induction task, sequences from another seed."""
    s = handle.structure
    seq = min(256, s.n_ctx)
    n_windows = max(1, math.ceil(n_tokens / seq))
    bos = handle.tokenizer.bos_token_id
    if handle.eval_task == "repeated-tokens":
        return data.repeated_tokens_batch(s.d_vocab - 1, bos, s.n_ctx, n=max(1, n_tokens // s.n_ctx), seed=7).tokens
    files = data.training_files()
    picks = files[:: max(1, len(files) // 64)]
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace")[: 8 * seq] for f in picks)
    ids = handle.tokenizer.encode(text, add_special_tokens=False)
    body = seq - (1 if bos is not None else 0)
    total = len(ids) // body
    if total == 0:
        raise ExitError("The training text is too short for one window.")
    starts = np.unique(np.linspace(0, total - 1, min(n_windows, total)).round().astype(int))
    rows = torch.tensor([ids[i * body:(i + 1) * body] for i in starts], dtype=torch.long)
    if bos is not None:
        rows = torch.cat([torch.full((len(rows), 1), bos, dtype=torch.long), rows], 1)
    return rows


@torch.no_grad()
def _normalised_states(handle: ModelHandle, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LN_final(h_l) for l = 0..L-1, [L, N, d], and the final logits [N, V], over every
    position but the first (BOS) of `tokens`, a few windows per forward."""
    xs, zs = [], []
    for chunk in tokens.split(8):
        states, logits = handle.exit_states(chunk)
        xs.append(torch.stack([handle.final_norm(h[:, 1:]).float().reshape(-1, h.shape[-1]) for h in states]))
        zs.append(logits[:, 1:].float().reshape(-1, logits.shape[-1]))
    return torch.cat(xs, 1), torch.cat(zs)


def _translator_kl(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, unembed: tuple,
                   log_p: torch.Tensor) -> torch.Tensor:
    """Mean KL(p || q_l) per depth [D] for translators [D, d, d] + [D, d] on x [D, N, d]
    against final log-probabilities log_p [N, V]."""
    w_u, b_u = unembed
    y = torch.baddbmm(bias[:, None], x, weight.transpose(1, 2))  # [D, N, d]
    z = y @ w_u.T if b_u is None else y @ w_u.T + b_u  # [D, N, V]
    return (log_p.exp() * (log_p - F.log_softmax(z, -1))).sum(-1).mean(-1)


def train_tuned_lens(handle: ModelHandle, progress: Progress | None = None, n_tokens: int = TRAIN_TOKENS,
                     flops: float = TRAIN_FLOPS, max_steps: int = TRAIN_STEPS, seed: int = 0) -> ExitLens:
    """Fit a tuned lens (translators for depths 0..L-1) on `training_tokens`. Deterministic
    for a given model, budget and seed, so a recipe that uses it rebuilds the same model."""
    check_exits(handle, "tuned")
    w_u, b_u = Reader(handle, LOGIT_LENS).unembed
    s = handle.structure
    vocab, d, L = w_u.shape[0], w_u.shape[1], s.n_layers
    n_tokens = max(256, min(n_tokens, MEMORY_LOGITS // vocab))
    if progress:
        progress(0.0, "tuned lens: reading the training text")
    x, z = _normalised_states(handle, training_tokens(handle, n_tokens))  # [L, N, d], [N, V]
    if progress:
        progress(0.2, f"tuned lens: least-squares fit on {z.shape[0]} tokens")
    # the final layer's normalised state, recovered from its logits: z = y W_U^T + b_U
    y_final = torch.linalg.lstsq(w_u, (z if b_u is None else z - b_u).T).solution.T  # [N, d]
    ones = torch.ones(x.shape[1], 1)
    weight, bias = torch.empty(L, d, d), torch.empty(L, d)
    for layer in range(L):
        design = torch.cat([x[layer], ones], 1)  # [N, d + 1]
        gram = design.T @ design + 1e-3 * torch.eye(d + 1)  # a little ridge: some directions barely vary
        solution = torch.linalg.solve(gram, design.T @ y_final)  # [d + 1, d]
        weight[layer], bias[layer] = solution[:d].T, solution[d]
    log_p = F.log_softmax(z, -1)
    steps = min(max_steps, int(flops // (6 * L * BATCH_TOKENS * (d * d + d * vocab))))
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimiser = torch.optim.Adam([weight, bias], lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for step in range(steps):
            rows = torch.randint(0, z.shape[0], (BATCH_TOKENS,), generator=generator)
            loss = _translator_kl(weight, bias, x[:, rows], (w_u, b_u), log_p[rows]).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if progress and step % 10 == 0:
                progress(0.3 + 0.6 * step / steps, f"tuned lens: KL step {step + 1} of {steps}")
    weight, bias = weight.detach(), bias.detach()
    with torch.no_grad():
        fit = torch.cat([_translator_kl(weight[i:i + 1], bias[i:i + 1], x[i:i + 1], (w_u, b_u), log_p)
                         for i in range(L)])
    if progress:
        progress(1.0, "tuned lens: done")
    return ExitLens("tuned", {l: weight[l] for l in range(L)}, {l: bias[l] for l in range(L)},
                    handle.fingerprint, tuple(fit.tolist()))


def train_exit_heads(handle: ModelHandle, progress: Progress | None = None, steps: int = 25) -> ExitLens:
    """Linear exit heads on the pooled features of every exit stage, trained by
    cross-entropy (L-BFGS, a little weight decay) on the training digits: seconds."""
    check_exits(handle, "heads")
    images, labels = data.digits_split("train")
    states, outputs = handle.exit_states(images)
    n_classes = outputs.shape[-1]
    depths = exit_depths(handle)
    weights, biases = {}, {}
    for i, depth in enumerate(depths):
        if progress:
            progress(i / len(depths), f"exit heads: stage {i + 1} of {len(depths)}")
        features = pooled(states[depth]).detach()  # [n, C]
        mean, scale = features.mean(0), features.std(0).clamp_min(1e-6)
        head = torch.nn.Linear(features.shape[1], n_classes)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        optimiser = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
        standard = (features - mean) / scale  # standardised: L-BFGS converges in about 20 steps

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            loss = F.cross_entropy(head(standard), labels) + 1e-3 * head.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimiser.step(closure)
        weight = head.weight.detach() / scale  # folded back onto the raw pooled features
        weights[depth], biases[depth] = weight, head.bias.detach() - weight @ mean
    if progress:
        progress(1.0, "exit heads: done")
    return ExitLens("heads", weights, biases, handle.fingerprint)
