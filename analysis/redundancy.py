"""Layer redundancy from one forward pass: how much each block, attention and MLP
sublayer changes the residual stream, how similar layers are, and what each layer
would predict. Definitions: METHODS.md §1.

Notation: h_l is the residual stream entering block l (point "resid_pre"), h_L the
output of the last block; m_l the residual after attention l ("resid_mid"). Token
statistics skip the first `skip` positions (BOS and the huge-norm "sink" positions
that dominate every similarity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from analysis.cka import cka_matrix
from lib.data import ImageBatch, TextBatch, check_batch
from lib.errors import AnalysisError
from lib.handle import ModelHandle, Point

Progress = Callable[[float, str], None]
DEFAULT_SKIP = 4


class RedundancyError(AnalysisError):
    """The model or batch cannot be analysed this way; the message says why."""


@dataclass(frozen=True)
class Residuals:
    """One forward pass worth of residual streams.

    resid: [L+1, batch, pos, d_model] h_0..h_L; mid: [L, batch, pos, d_model] m_l;
    logits: [batch, pos, vocab] the model's output = readout(h_L), or None when the
    pass was collected for statistics that do not need it (see `final_logits`);
    batch_digest: the `digest` of the batch they were recorded on; has_mlp: False for
    an attention-only model.
    """

    resid: torch.Tensor
    mid: torch.Tensor
    logits: torch.Tensor | None
    skip: int
    batch_digest: str = ""
    has_mlp: bool = True


@dataclass(frozen=True)
class LayerSimilarity:
    """Per-layer statistics from one pass (cosines averaged over evaluation tokens).

    block, attention, mlp: [L] cos(h_l, h_{l+1}), cos(h_l, m_l), cos(m_l, h_{l+1});
    angular: [L+1, L+1] arccos(cos(h_i, h_j)) / pi at the last token, mean over prompts;
    cka: [L+1, L+1] linear CKA between depths; norms: [L+1] mean ||h_l||;
    relative_update: [L] mean ||h_{l+1} - h_l|| / ||h_l||; has_mlp: False for an
    attention-only model (its `mlp` cosines are 1 and are left out of every ranking).
    """

    block: torch.Tensor
    attention: torch.Tensor
    mlp: torch.Tensor
    angular: torch.Tensor
    cka: torch.Tensor
    norms: torch.Tensor
    relative_update: torch.Tensor
    n_tokens: int
    skip: int
    has_mlp: bool = True

    @property
    def kinds(self) -> tuple[str, ...]:
        """The sublayer kinds this model has."""
        return ("attention", "mlp") if self.has_mlp else ("attention",)

    @property
    def n_layers(self) -> int:
        return int(self.block.numel())

    def importance(self) -> dict[str, torch.Tensor]:
        """1 - similarity for each module type the model has: [L] each."""
        imp = {"block": 1 - self.block, "attention": 1 - self.attention, "mlp": 1 - self.mlp}
        return {k: v for k, v in imp.items() if k == "block" or k in self.kinds}

    def joint_ranking(self) -> list[tuple[str, int, float]]:
        """All attention and MLP sublayers (2L, or L without MLPs), least important
        first: (kind, layer, importance)."""
        imp = self.importance()
        rows = [(kind, layer, float(imp[kind][layer])) for kind in self.kinds for layer in range(self.n_layers)]
        return sorted(rows, key=lambda r: r[2])


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


def check_lm(handle: ModelHandle, batch: TextBatch, skip: int) -> None:
    check_batch(handle, batch)
    if handle.kind != "causal-lm" or not isinstance(batch, TextBatch):
        raise RedundancyError("This analysis needs a transformer language model and a text batch.")
    if handle.structure.n_layers < 2:
        raise RedundancyError(
            f"The model has {handle.structure.n_layers} layer; comparing layers needs at least 2.")
    if not isinstance(skip, int) or isinstance(skip, bool) or skip < 0:
        raise RedundancyError(f"The number of skipped positions is a whole number >= 0, not {skip!r}.")
    if batch.tokens.shape[1] <= skip + 1:
        raise RedundancyError(
            f"The evaluation windows have {batch.tokens.shape[1]} positions, not more than the "
            f"{skip} skipped first positions plus one. Skip fewer positions or use longer windows.")


def collect_residuals(handle: ModelHandle, batch: TextBatch, skip: int = DEFAULT_SKIP,
                      with_logits: bool = True) -> Residuals:
    """One forward pass recording h_0..h_L and m_0..m_{L-1}.

    The pass stops after the last block; the final LayerNorm and unembedding run on
    h_L only when `with_logits` (the one-pass statistics never need them; the logit
    lens and the drop sweep do, and get them from `final_logits` either way).
    """
    check_lm(handle, batch, skip)
    L = handle.structure.n_layers
    pre = [Point("resid_pre", l) for l in range(L)]
    mid = [Point("resid_mid", l) for l in range(L)]
    last = Point("resid_post", L - 1)
    cache = handle.record(batch.tokens, pre + mid + [last])
    missing = [f"{p.site} {p.layer}" for p in pre + mid + [last] if p not in cache]
    if missing:
        raise RedundancyError(
            f"This model does not expose {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''} "
            "(for example, attention and MLP run in parallel), so its sublayers cannot be "
            "compared this way.")
    resid = torch.stack([cache[n] for n in pre] + [cache[last]])
    logits = handle.readout(resid[-1]) if with_logits else None
    return Residuals(resid, torch.stack([cache[n] for n in mid]), logits, skip, batch.digest,
                     has_mlp=handle.structure.d_mlp > 0)


def final_logits(handle: ModelHandle, res: Residuals) -> torch.Tensor:
    """The model's logits [batch, pos, vocab] for the recorded pass: the cached ones,
    or one readout of h_L (which is what the model's own forward computes)."""
    return res.logits if res.logits is not None else handle.readout(res.resid[-1])


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token cosine over the last dim: [..., d] x [..., d] -> [...]."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)


def _angle(unit: torch.Tensor) -> torch.Tensor:
    """Angles between all pairs of unit vectors [batch, n, d] -> [batch, n, n], as
    2 atan2(||u - v||, ||u + v||): unlike arccos(u . v), exact near 0 and pi."""
    mode = "donot_use_mm_for_euclid_dist"
    return 2 * torch.atan2(torch.cdist(unit, unit, compute_mode=mode),
                           torch.cdist(unit, -unit, compute_mode=mode))


def layer_similarity(res: Residuals) -> LayerSimilarity:
    """Every one-pass statistic of METHODS §1 from recorded residuals."""
    h = res.resid[:, :, res.skip:].float()  # [L+1, batch, pos', d]
    m = res.mid[:, :, res.skip:].float()  # [L, batch, pos', d]
    h_norm = h.norm(dim=-1)  # [L+1, batch, pos'], reused for cosines, norms and updates
    unit_h = h / h_norm.clamp_min(1e-12)[..., None]
    unit_m = m / m.norm(dim=-1).clamp_min(1e-12)[..., None]
    block = (unit_h[:-1] * unit_h[1:]).sum(-1).mean((1, 2))
    attention = (unit_h[:-1] * unit_m).sum(-1).mean((1, 2))
    mlp = (unit_m * unit_h[1:]).sum(-1).mean((1, 2))
    last = unit_h[:, :, -1].transpose(0, 1)  # [batch, L+1, d]
    angular = _angle(last).mean(0) / math.pi
    flat = [layer.reshape(-1, layer.shape[-1]) for layer in h]  # each [N, d]
    update = (h[1:] - h[:-1]).norm(dim=-1) / h_norm[:-1].clamp_min(1e-12)
    return LayerSimilarity(block, attention, mlp, angular, cka_matrix(flat), h_norm.mean((1, 2)),
                           update.mean((1, 2)), flat[0].shape[0], res.skip, res.has_mlp)


LENS_CHUNK_ELEMENTS = 1 << 26  # logits per token chunk (256 MB in float32); the lens holds 2-3 chunk buffers


Affine = tuple[torch.Tensor, torch.Tensor | None] | None


def _float32_unembedding(handle: ModelHandle) -> Affine:
    """(W_U [vocab, d], b_U [vocab] or None; an all-zero b_U is None) when the readout is
    affine and float32, else None (then every depth takes one generic readout)."""
    affine = handle.unembedding()
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
        return handle.readout(h).float(), None
    weight, bias = affine
    x = handle.final_norm(h)
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
def logit_lens(handle: ModelHandle, res: Residuals, progress: Progress | None = None) -> LogitLens:
    """Logit lens at every depth, LN_final recomputed on each h_l itself.

    Per token: entropy H(p_l) = -<p_l, log p_l> and KL(p_L || p_l) = -H(p_L) - <p_L, log p_l>.
    Each depth costs its readout matmul (into one reused buffer) plus one log-softmax pass
    (`_lens_stats`); <p_L, log p_l> comes from `_reference_dot`. The final depth goes
    first. Tokens go in chunks of at most LENS_CHUNK_ELEMENTS logits, so memory stays
    bounded (one chunk of 992 x 50257 for GPT-2 on 8 x 128 windows).
    """
    L = handle.structure.n_layers
    h = res.resid[:, :, res.skip:].reshape(L + 1, -1, res.resid.shape[-1])  # [L+1, N, d]
    n_tokens = h.shape[1]
    affine = _float32_unembedding(handle)
    vocab = res.logits.shape[-1] if res.logits is not None else handle.structure.d_vocab
    rows = max(1, LENS_CHUNK_ELEMENTS // max(vocab, 1))  # tokens per chunk; buffers take the logits' own width
    n_steps = -(-n_tokens // rows) * L
    kl, ent = torch.zeros(L + 1, dtype=torch.float64), torch.zeros(L + 1, dtype=torch.float64)
    agree = torch.zeros(L + 1, dtype=torch.long)  # tokens whose top-1 is the final layer's
    z_buffer = p_final = probs = None  # [rows, vocab] each, made from the first (largest) chunk's logits
    for chunk, start in enumerate(range(0, n_tokens, rows)):
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
                progress((chunk * L + layer + 1) / n_steps, f"logit lens: depth {layer}")
    return LogitLens((kl / n_tokens).float().clamp_min(0), agree.float() / n_tokens, (ent / n_tokens).float())


@dataclass(frozen=True)
class StageSimilarity:
    """Image models: names[0] is the input, then every stage's output.

    cka: [n, n] linear CKA between the flattened representations (one row per image);
    similarity: stage -> mean cos(input, output) per image, for stages whose input and
    output shapes match; norms: [n] mean activation norm per image.
    """

    names: list[str]
    cka: torch.Tensor
    similarity: dict[str, float]
    norms: torch.Tensor


@torch.no_grad()
def stage_similarity(handle: ModelHandle, batch: ImageBatch) -> StageSimilarity:
    """CKA across all stages and in/out similarity where shapes match (one pass)."""
    check_batch(handle, batch)
    names = [name for name, _ in handle.structure.stages]
    cache = handle.record(batch.images, [Point("stage", n) for n in names])
    reps = [batch.images] + [cache[Point("stage", n)] for n in names]
    flat = [r.reshape(r.shape[0], -1).float() for r in reps]  # each [images, features]
    sims = {
        name: float(token_cosine(flat[i], flat[i + 1]).mean())
        for i, name in enumerate(names) if reps[i].shape == reps[i + 1].shape
    }
    norms = torch.stack([f.norm(dim=-1).mean() for f in flat])
    return StageSimilarity(["input"] + names, cka_matrix(flat), sims, norms)
