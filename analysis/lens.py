"""Lenses: reading the residual stream (or a stage's features) at an intermediate depth as a
prediction. One readout, `Reader`, serves the Redundancy view and early exits alike.

- "logit": the logit lens of a language model, final LayerNorm + unembedding applied to
  h_l itself (METHODS §1); no parameters. `logit_lens` computes its per-depth statistics
  (KL to the final layer, top-1 agreement, entropy) for the Redundancy view.
- "tuned": a tuned lens, one affine translator per depth, logits_l = W_U (A_l LN(h_l) + b_l)
  + b_U, trained on the evaluation set's training part to minimise KL(p_L || p_l). The
  translator sits after the final LayerNorm (Belrose et al. 2023 put theirs before it), so
  the LayerNorm needs no gradient and the readout stays one affine map. Fitted in two
  steps: least squares from LN(h_l) to the final layer's normalised state (recovered from
  the logits), then Adam steps on the KL itself as far as a FLOP budget allows.
- "heads": for image classifiers, a linear head per exit stage on the stage's globally
  average-pooled features (trained by `analysis.compress.exits.readouts.train_exit_heads`).

Depth l means "after l layers": the state read at depth l is the input of layer l
(`ModelHandle.exit_states`); depth n_layers is the model's own output. Which depths a
model exits at, and the trained lenses kept per model, are the exits'
(`analysis.compress.exits.readouts`); the exits' KL per depth through any lens is
`analysis.compress.exits.stats.lens_kl`, which agrees with `logit_lens` (tests/test_lens.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from analysis.redundancy.similarity import Residuals
from lib import corpus, data
from lib.errors import CapabilityError, require_type
from lib.handle import ModelHandle, check_handle
from lib.progress import Progress

LENSES = ("logit", "tuned", "heads")
LENS_LABELS = {"logit": "logit lens", "tuned": "tuned lens", "heads": "exit heads"}

TRAIN_TOKENS = 8192  # tokens (LMs) the tuned lens is fitted on, fewer for large vocabularies
TRAIN_FLOPS = 2e11  # budget of the KL refinement: a few seconds of CPU on zoo:code-lm
TRAIN_STEPS = 150  # at most this many Adam steps
BATCH_TOKENS = 512
MEMORY_LOGITS = 1 << 26  # at most this many floats of final-layer logits (256 MB) held for training


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


# ---------------------------------------------------------------------- reading out


def check_tuned(handle: ModelHandle) -> None:
    """Refuse a model a tuned lens cannot read: it needs a language model whose readout is
    an affine unembedding."""
    if handle.kind != "causal-lm" or handle.blocks.unembedding() is None:
        raise CapabilityError("The tuned lens needs a language model with an affine unembedding, which this "
                              f"model ({handle.kind}) does not have.")


def pooled(state: torch.Tensor) -> torch.Tensor:
    """Global average pooling: [n, C, H, W] -> [n, C]; [n, F] stays."""
    return state.float().mean(dim=tuple(range(2, state.dim()))) if state.dim() > 2 else state.float()


class Reader:
    """Turns the states of one pass into logits through a lens (float32)."""

    def __init__(self, handle: ModelHandle, lens: ExitLens) -> None:
        self.handle, self.lens = handle, lens
        self.unembed = None
        if lens.kind != "heads":
            affine = handle.blocks.unembedding()
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
        x = self.handle.blocks.final_norm(state).float()  # [N, d]
        if lens.kind == "tuned" and depth in lens.weight:
            x = torch.addmm(lens.bias[depth], x, lens.weight[depth].T)
        return x, *self.unembed

    def logits(self, depth: int, state: torch.Tensor) -> torch.Tensor:
        """Logits [N, classes] of states [N, ...] read at `depth`."""
        parts = self.affine(depth, state)
        if parts is None:
            return self.handle.blocks.readout(state).float()
        x, weight, bias = parts
        return x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)


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
    files = corpus.training_files()
    picks = files[:: max(1, len(files) // 64)]
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace")[: 8 * seq] for f in picks)
    ids = handle.tokenizer.encode(text, add_special_tokens=False)
    body = seq - (1 if bos is not None else 0)
    total = len(ids) // body
    if total == 0:
        raise CapabilityError("The training text is too short for one window.")
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
        xs.append(torch.stack([handle.blocks.final_norm(h[:, 1:]).float().reshape(-1, h.shape[-1]) for h in states]))
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
    check_tuned(handle)
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


# ---------------------------------------------------------------------- the logit lens, per depth


@dataclass(frozen=True)
class LogitLens:
    """Logit lens per depth l = 0..L: logits_l = W_U LN_final(h_l) + b_U.

    kl: [L+1] mean KL(p_L || p_l) in nats; agreement: [L+1] top-1 agreement with the
    final layer (the share of tokens whose final top-1 token is also the top-1 of p_l; an
    exact tie for the top counts as agreement); entropy: [L+1] mean entropy of p_l in nats.
    """

    kl: torch.Tensor
    agreement: torch.Tensor
    entropy: torch.Tensor

LENS_CHUNK_ELEMENTS = 1 << 24  # logits per token chunk (64 MB in float32); the lens holds 2-3 chunk buffers


Affine = tuple[torch.Tensor, torch.Tensor | None] | None


def _float32_unembedding(handle: ModelHandle) -> Affine:
    """(W_U [vocab, d], b_U [vocab] or None; an all-zero b_U is None) when the readout is
    affine and float32, else None (then every depth takes one generic readout)."""
    affine = handle.blocks.unembedding()
    if affine is None or affine[0].dtype != torch.float32:
        return None
    weight, bias = affine
    return weight, None if bias is None or not bias.any() else bias


def _depth_logits(handle: ModelHandle, h: torch.Tensor, affine: Affine,
                  out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float32 logits of h [n, d], [n, vocab], a tensor the caller may overwrite, and
    LN_final(h) [n, d] when the readout is `affine` (else None).

    With `affine` one addmm writes the logits into `out` (a buffer reused across depths:
    a fresh [n, vocab] tensor pays its page faults at every depth); otherwise, or without
    `out`, they are a fresh tensor.
    """
    if affine is None:
        return handle.blocks.readout(h).float(), None
    weight, bias = affine
    x = handle.blocks.final_norm(h)
    if bias is None:
        return torch.mm(x, weight.T, out=out), x
    return torch.addmm(bias, x, weight.T, out=out), x


def _final_logits_rows(handle: ModelHandle, res: Residuals, h_final: torch.Tensor, start: int, stop: int,
                       affine: Affine, out: torch.Tensor | None) -> torch.Tensor:
    """The model's own float32 logits [n, vocab] for evaluation tokens start..stop-1 (the
    flattened [batch, pos - skip] order of h_final [N, d]): rows of the cached
    `res.logits`, else a readout of h_L."""
    if res.logits is None:
        return _depth_logits(handle, h_final[start:stop], affine, out)[0]
    batch, pos, vocab = res.logits.shape
    token = torch.arange(start, stop)
    rows = token // (pos - res.skip) * pos + res.skip + token % (pos - res.skip)
    flat = res.logits.reshape(batch * pos, vocab)  # a view of the usual contiguous logits
    if out is None or flat.dtype != out.dtype:
        return flat.index_select(0, rows).float()
    return torch.index_select(flat, 0, rows, out=out)


ReferenceDot = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor], torch.Tensor]


def _reference_dot(p_final: torch.Tensor, affine: Affine) -> ReferenceDot:
    """<p_L, log p_l> per token [n] as a function of (log p_l [n, vocab], LN_final(h_l)
    [n, d] or None, lse(z_l) [n], a scratch [n, vocab]), for p_final = p_L [n, vocab].

    With an affine readout z_l = x_l W_U^T + b_U, so <p_L, log p_l> = x_l . (p_L W_U) +
    <p_L, b_U> - lse(z_l) sum(p_L): one [n, vocab] x [vocab, d] product here instead of
    a pass over [n, vocab] at every depth, and p_final is not read again. Otherwise a
    product through the scratch and a sum.
    """
    if affine is not None:
        weight, bias = affine
        q = p_final @ weight  # [n, d]
        pb = torch.zeros(()) if bias is None else p_final @ bias  # [n]
        mass = p_final.sum(-1)  # [n], 1 up to rounding; kept so both sums of the KL weigh alike
        return lambda logp, x, lse, scratch: torch.linalg.vecdot(x, q) + pb - lse * mass
    return lambda logp, x, lse, scratch: torch.mul(p_final, logp, out=scratch).sum(-1)


def _lens_stats(z: torch.Tensor, probs: torch.Tensor, top_final: torch.Tensor, x: torch.Tensor | None = None,
                reference: ReferenceDot | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token statistics of p = softmax(z) for logits z [n, vocab]: entropy H(p),
    <p_L, log p> (None without `reference`), and whether the final layer's top-1 token
    `top_final` [n] is a top-1 token of z (bool), each [n].

    Five ops over [n, vocab], each on the whole chunk (on a busy machine every op is a
    thread barrier, so few large ops beat many cache-sized ones): max, log-softmax in
    place, exp, product, sum. The max needs no index (three times cheaper): top-1
    agreement is z[top_final] == max z, so an exact tie for the top counts as agreement.
    lse = z - log p at top_final. Leaves p in `probs` [n, vocab] (after `reference` used
    it as scratch); overwrites z.
    """
    z_top = z.gather(-1, top_final[:, None]).squeeze(-1)
    agrees = z_top == z.amax(-1)
    logp = torch.log_softmax(z, -1, out=z)
    cross = None
    if reference is not None:
        cross = reference(logp, x, z_top - logp.gather(-1, top_final[:, None]).squeeze(-1), probs)
    torch.exp(logp, out=probs)
    entropy = -torch.mul(probs, logp, out=logp).sum(-1)
    return entropy, cross, agrees


@torch.no_grad()
def logit_lens(handle: ModelHandle, res: Residuals, progress: Progress | None = None,
               so_far: dict | None = None) -> LogitLens:
    """Logit lens at every depth, LN_final recomputed on each h_l itself.

    Per token: entropy H(p_l) = -<p_l, log p_l> and KL(p_L || p_l) = -H(p_L) - <p_L, log p_l>.
    Each depth costs its readout matmul (into one reused buffer) plus one log-softmax pass
    (`_lens_stats`); <p_L, log p_l> comes from `_reference_dot`. The final depth goes
    first. Tokens go in chunks of at most LENS_CHUNK_ELEMENTS logits, so memory stays
    bounded (one chunk of 992 x 50257 for GPT-2 on 8 x 128 windows).

    so_far: a dict the caller keeps across an interrupted lens: after each chunk it holds
    (the chunks done, their sums) as one value, with the lens's shape, and a call with it
    goes on from the next chunk (one value, read once: another run writing it meanwhile
    cannot mix its chunks with this run's sums; a shape that differs starts over).
    """
    check_handle(handle)
    require_type(res, Residuals, "The residuals")
    L = handle.structure.n_layers
    h = res.resid[:, :, res.skip:].reshape(L + 1, -1, res.resid.shape[-1])  # [L+1, N, d]
    n_tokens = h.shape[1]
    affine = _float32_unembedding(handle)
    vocab = res.logits.shape[-1] if res.logits is not None else handle.structure.d_vocab
    rows = max(1, LENS_CHUNK_ELEMENTS // max(vocab, 1))  # tokens per chunk; buffers take the logits' own width
    n_steps = -(-n_tokens // rows) * L
    so_far = {} if so_far is None else so_far
    shape = (n_tokens, rows, L)
    done, sums = so_far.get("state", (0, None)) if so_far.get("shape") == shape else (0, None)
    kl, ent, agree = (t.clone() for t in sums) if sums else (
        torch.zeros(L + 1, dtype=torch.float64), torch.zeros(L + 1, dtype=torch.float64),
        torch.zeros(L + 1, dtype=torch.long))  # agree: tokens whose top-1 is the final layer's
    z_buffer = p_final = probs = None  # [rows, vocab] each, made from the first (largest) chunk left's logits
    for chunk, start in enumerate(range(0, n_tokens, rows)):
        if chunk < done:
            continue
        stop = min(start + rows, n_tokens)
        n = stop - start
        z = _final_logits_rows(handle, res, h[L], start, stop, affine, None if z_buffer is None else z_buffer[:n])
        if p_final is None:
            p_final = torch.empty_like(z)
            z_buffer = z if affine is not None else None  # a generic readout makes its own logits
            probs = p_final if affine is not None else torch.empty_like(z)  # an affine reference reads p_L once
        top_final = z.max(-1).indices  # the first maximum, like argmax, in half its time
        entropy, _, _ = _lens_stats(z, p_final[:n], top_final)
        neg_ent_final = -entropy
        ent[L] += entropy.sum()
        agree[L] += n
        reference_dot = _reference_dot(p_final[:n], affine)
        for layer in range(L):
            z, x = _depth_logits(handle, h[layer, start:stop], affine, None if z_buffer is None else z_buffer[:n])
            entropy, cross, agrees = _lens_stats(z, probs[:n], top_final, x, reference_dot)
            kl[layer] += (neg_ent_final - cross).sum()
            ent[layer] += entropy.sum()
            agree[layer] += agrees.sum()
            if progress:
                progress((chunk * L + layer + 1) / n_steps,
                         f"tokens {start + 1}–{stop} of {n_tokens}: depth {layer + 1} of {L}")
        so_far.update(shape=shape, state=(chunk + 1, (kl.clone(), ent.clone(), agree.clone())))
    return LogitLens((kl / n_tokens).float().clamp_min(0), agree.float() / n_tokens, (ent / n_tokens).float())
