"""Layer redundancy from one forward pass: how much each block, attention and MLP
sublayer changes the residual stream, and how similar layers are (what each depth would
predict is `analysis.lens.logit_lens`). Definitions: METHODS.md §1.

Notation: h_l is the residual stream entering block l (point "resid_pre"), h_L the
output of the last block; m_l = h_l + attention l's write ("resid_mid"). In a parallel
block (GPT-NeoX, Phi: both sublayers read h_l) m_l is what the block would give with
its MLP dropped, and the MLP is compared with what it reads, h_l. Token
statistics skip the first `skip` positions (BOS and the huge-norm "sink" positions
that dominate every similarity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from analysis.redundancy.cka import cka_matrix
from lib.data import ImageBatch, TextBatch, check_batch, check_lm
from lib.errors import AnalysisError, CapabilityError, require_type
from lib.handle import ModelHandle, Point
from lib.progress import Progress
from lib.scoring import Logits, logits_of

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
    an attention-only model; parallel: attention and MLP both read h_l.
    """

    resid: torch.Tensor
    mid: torch.Tensor
    logits: torch.Tensor | None
    skip: int
    batch_digest: str = ""
    has_mlp: bool = True
    parallel: bool = False


@dataclass(frozen=True)
class LayerSimilarity:
    """Per-layer statistics from one pass (cosines averaged over evaluation tokens).

    block, attention, mlp: [L] cos(h_l, h_{l+1}), cos(h_l, m_l), cos(m_l, h_{l+1}) (in a
    parallel block the MLP's is cos(h_l, h_l + f_l), f_l = h_{l+1} - m_l its write);
    angular: [L+1, L+1] arccos(cos(h_i, h_j)) / pi at the last token, mean over prompts;
    cka: [L+1, L+1] linear CKA between depths; norms: [L+1] mean ||h_l||;
    relative_update: [L] mean ||h_{l+1} - h_l|| / ||h_l||; has_mlp: False for an
    attention-only model (its `mlp` cosines are 1 and are left out of every ranking);
    parallel: attention and MLP of a block both read h_l.
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
    parallel: bool = False

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



def check_depths(handle: ModelHandle, batch: TextBatch, skip: int) -> None:
    """Refuse what cannot be compared layer by layer: anything but a language model and a
    text batch that fits it (`lib.data.check_lm`), a model of one layer, and a skip that
    leaves no position to compare."""
    check_lm(handle, "Comparing layers", batch)
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
                      with_logits: bool = True, progress: Progress | None = None) -> Residuals:
    """One forward pass recording h_0..h_L and m_0..m_{L-1} (`progress` told as each is
    recorded: an exception it raises ends the pass, and nothing of it is kept).

    The pass stops after the last block; the final LayerNorm and unembedding run on
    h_L only when `with_logits` (the one-pass statistics never need them; the logit
    lens and the drop sweep do, and get them from `final_logits` either way).
    """
    check_depths(handle, batch, skip)
    require_type(with_logits, bool, "with_logits")
    L, points = handle.structure.n_layers, residual_points(handle)
    told = None if progress is None else lambda n, of: progress(n / of, f"{n * L // of} of {L} blocks")  # 2L+1 points
    res = _residuals(handle, batch, handle.record(batch.tokens, points, told), skip)
    return res if not with_logits else replace(res, logits=handle.blocks.readout(res.resid[-1]))


def residual_points(handle: ModelHandle) -> list[Point]:
    """What a residual pass records: h_0..h_{L-1} (resid_pre), m_0..m_{L-1} (resid_mid), h_L."""
    L = handle.structure.n_layers
    return [Point("resid_pre", l) for l in range(L)] + [Point("resid_mid", l) for l in range(L)] \
        + [Point("resid_post", L - 1)]


def residual_bytes(handle: ModelHandle, batch: TextBatch) -> int:
    """What a residual pass over `batch` holds: 2L+1 states [batch, pos, d_model] in the model's dtype."""
    return (2 * handle.structure.n_layers + 1) * batch.tokens.numel() * handle.structure.d_model * handle.dtype.itemsize


def outputs_with_residuals(handle: ModelHandle, batch: TextBatch) -> tuple[Logits, Residuals | None] | None:
    """The model's outputs on `batch` (`handle.outputs`'s, unchanged) and the residual pass of
    `collect_residuals` (skip 0, no logits) from one forward: the pass a baseline needs feeds
    every per-layer statistic too. None where the model cannot record in its own forward (then
    they are two passes); no residuals where the forward did not give every state."""
    check_depths(handle, batch, 0)
    try:
        got = handle.outputs_recording(batch.tokens, residual_points(handle))
    except CapabilityError:  # a point this model does not have: refused before the forward
        return None
    if got is None:
        return None
    outputs, cache = got
    try:
        return outputs, _residuals(handle, batch, cache, 0)
    except RedundancyError:
        return outputs, None


def _residuals(handle: ModelHandle, batch: TextBatch, cache: dict[Point, torch.Tensor], skip: int) -> Residuals:
    """The Residuals of a pass's recorded `cache` (emptied as it is stacked), without logits."""
    L = handle.structure.n_layers
    points = residual_points(handle)
    missing = [f"{p.site} {p.layer}" for p in points if p not in cache]
    if missing:
        raise RedundancyError(
            f"This model does not expose {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''} "
            "(for example, attention and MLP run in parallel), so its sublayers cannot be "
            "compared this way.")
    resid, mids = _stacked(cache, points[:L] + points[-1:]), _stacked(cache, points[L:2 * L])
    return Residuals(resid, mids, None, skip, batch.digest, has_mlp=handle.structure.d_mlp > 0,
                     parallel=handle.structure.parallel)


def _stacked(cache: dict[Point, torch.Tensor], points: list[Point]) -> torch.Tensor:
    """torch.stack of the recorded `points`, each taken out of `cache` as it is copied, so
    the recorded tensors and their stack are never all held at once."""
    first = cache[points[0]]
    out = torch.empty((len(points), *first.shape), dtype=first.dtype, device=first.device)
    for i, point in enumerate(points):
        out[i] = cache.pop(point)
    return out


def final_logits(handle: ModelHandle, res: Residuals) -> Logits:
    """The model's logits [batch, pos, vocab] for the recorded pass: the cached ones, or
    the readout of h_L (which is what the model's own forward computes), held or read
    out chunk by chunk as they are scored (`lib.scoring.logits_of`)."""
    if res.logits is not None:
        return res.logits
    return logits_of(res.resid[-1], handle.blocks.readout, handle.structure.d_vocab)


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
    m_norm = m.norm(dim=-1).clamp_min(1e-12)
    safe = h_norm.clamp_min(1e-12)

    def cos(a: torch.Tensor, b: torch.Tensor, na: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
        return (torch.linalg.vecdot(a, b) / (na * nb)).mean()

    # one layer at a time: temporaries of one layer's [batch, pos', d], never of all depths
    L = m.shape[0]
    block = torch.stack([cos(h[l], h[l + 1], safe[l], safe[l + 1]) for l in range(L)])
    attention = torch.stack([cos(h[l], m[l], safe[l], m_norm[l]) for l in range(L)])
    if res.parallel:  # the MLP read h_l and wrote f_l = h_{l+1} - m_l
        mlp = torch.stack([token_cosine(h[l], h[l] + h[l + 1] - m[l]).mean() for l in range(L)])
    else:
        mlp = torch.stack([cos(m[l], h[l + 1], m_norm[l], safe[l + 1]) for l in range(L)])
    last = (h[:, :, -1] / safe[:, :, -1, None]).transpose(0, 1)  # [batch, L+1, d]
    angular = _angle(last).mean(0) / math.pi
    flat = [layer.reshape(-1, layer.shape[-1]) for layer in h]  # each [N, d]
    update = torch.stack([(h[l + 1] - h[l]).norm(dim=-1) / safe[l] for l in range(L)])
    return LayerSimilarity(block, attention, mlp, angular, cka_matrix(flat), h_norm.mean((1, 2)),
                           update.mean((1, 2)), flat[0].shape[0], res.skip, res.has_mlp, res.parallel)


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
