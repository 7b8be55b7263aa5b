"""What a recipe changed, not only how much: the base and the edited model side by side.

- `flips`: the positions (text) or images whose top-1 answer changed, worst KL first, and
  `psnr_drops`: a denoiser's images whose PSNR fell most (both from the lab's per-position
  scores, `lib.spread.Scores`); `kl_strip`: KL(base || edited) at every position of a window.
- `depth_profile`: the logit lens (`analysis.lens.logit_lens`, the Redundancy page's) and
  the change each block makes, 1 - cos(h_l, h_{l+1}), of one model from its own blocks,
  so it also runs on a copy with blocks removed (a removed block changes nothing).
- `role_changes`: every head's role scores (`analysis.channels.heads`, the Channels
  page's) in the base and the edited copy on the same probe, and the heads that lost theirs.

    profile = depth_profile(lab.edited(), lab.batch); base = depth_profile(lab.base, lab.batch)
    changes = role_changes(lab.base, lab.edited(), lab.batch)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from analysis.channels.heads import ROLE_THRESHOLDS, head_roles, role_probe, roles_from_patterns
from analysis.lens import LogitLens, logit_lens
from analysis.redundancy.similarity import DEFAULT_SKIP, Residuals, token_cosine
from lib.data import Batch, TextBatch, check_lm
from lib.errors import AnalysisError, require_int
from lib.handle import ModelHandle, Point
from lib.progress import Progress, stage
from lib.scoring import readout_blocks
from lib.spread import Scores

FLIPS_SHOWN = 20  # the worst flips listed
INTERNAL_WINDOWS = 4  # evaluation windows the side-by-side internals read: a few seconds on the bundled models
ROLE_SCORES = tuple(ROLE_THRESHOLDS)


@dataclass(frozen=True)
class Flip:
    """One answer the edit changed. unit: the window (text) or image; position: the
    predicted position in the window (its target is token position + 1; 0 for images);
    kl: KL(base || edited) there (None for a denoiser); base_top1, top1: the two answers;
    target: the right answer (the next token, or the image's label)."""

    unit: int
    position: int
    kl: float | None
    base_top1: int
    top1: int
    target: int | None


def flips(scores: Scores, batch: Batch, limit: int = FLIPS_SHOWN) -> tuple[list[Flip], int]:
    """The `limit` flipped answers with the largest KL, and how many flipped in all."""
    limit = require_int(limit, "The number of flips shown", 1, 10**6)
    flipped = scores.flipped
    if flipped is None:
        return [], 0
    rows = flipped.nonzero()[:, 0]
    order = rows[scores.kl[rows].argsort(descending=True, stable=True)] if scores.kl is not None else rows
    if isinstance(batch, TextBatch):
        targets = batch.tokens[:, 1:].reshape(-1).cpu()
    else:
        targets = batch.labels.cpu()
    shown = [Flip(int(scores.unit_of[r]), int(r) % scores.width, None if scores.kl is None else float(scores.kl[r]),
                  int(scores.base_top1[r]), int(scores.top1[r]), int(targets[r])) for r in order[:limit]]
    return shown, int(rows.numel())


@dataclass(frozen=True)
class PsnrDrop:
    """A denoised image and its PSNR (dB) from the base and from the edited model."""

    image: int
    base_db: float
    edited_db: float


def psnr_drops(scores: Scores, base: Scores, limit: int = FLIPS_SHOWN) -> list[PsnrDrop]:
    """A denoiser's `limit` images whose PSNR fell most (largest fall first)."""
    if scores.sq_err is None or base.sq_err is None:
        return []

    def db(err: torch.Tensor) -> torch.Tensor:
        return 10 * torch.log10(1.0 / err.double().clamp_min(1e-12))

    mine, theirs = db(scores.sq_err), db(base.sq_err)
    order = (theirs - mine).argsort(descending=True, stable=True)[:limit]
    return [PsnrDrop(int(i), float(theirs[i]), float(mine[i])) for i in order]


def kl_strip(scores: Scores, window: int) -> torch.Tensor:
    """KL(base || edited) [predicted positions] at every position of evaluation window `window`."""
    if scores.kl is None or scores.unit != "window":
        raise AnalysisError("A KL strip needs a language model's per-token KL against its base.")
    window = require_int(window, "The window", 0, scores.n_units - 1)
    return scores.kl[window * scores.width:(window + 1) * scores.width]


# ---------------------------------------------------------------------- internals


@dataclass(frozen=True)
class DepthProfile:
    """One model's internals per depth on a few evaluation windows.

    lens: the logit lens at depths 0..L (KL to the model's own output, top-1 agreement);
    block_change: [L] 1 - cos(h_l, h_{l+1}) averaged over tokens (0 for a removed block);
    removed: the parts removed from the model (`Structure.removed`).
    """

    lens: LogitLens
    block_change: torch.Tensor
    removed: tuple[str, ...]


def internal_batch(batch: TextBatch, windows: int = INTERNAL_WINDOWS) -> TextBatch:
    """The first `windows` windows of the evaluation batch, which the internals read."""
    return TextBatch(batch.tokens[:windows], 0, batch.has_bos, batch.source, None if batch.answer_mask is None
                     else batch.answer_mask[:windows])


def internals_in_forwards(handle: ModelHandle, batch: TextBatch) -> float:
    """What reading one model's internals costs (`depth_profile` on `internal_batch(batch)`
    and `role_changes`' probe), in forwards of the whole `batch` (a forward: every block, then
    the readout, `readout_blocks`): about two forwards' blocks for the states (their note), a
    readout per depth, and the probe's blocks (no readout)."""
    L, readout = handle.structure.n_layers, readout_blocks(handle)
    rows, T = batch.tokens.shape
    windows = min(INTERNAL_WINDOWS, rows)
    probe = role_probe(handle, vocabulary=batch.tokens).numel()
    work = windows * T * (2 * L + (L + 1) * readout) + probe * L
    return work / (rows * T * (L + readout))


@torch.no_grad()
def depth_profile(handle: ModelHandle, batch: TextBatch, skip: int = DEFAULT_SKIP,
                  progress: Progress | None = None) -> DepthProfile:
    """The logit lens and block changes of `handle` over positions `skip` onward of `batch`,
    from the streams entering each block (`exit_states`) and the last block run once more.
    `progress`: the blocks of the forward, then the lens (one readout per depth), each
    given its share of the bar by `readout_blocks`."""
    check_lm(handle, "A side-by-side of internals", batch)
    skip = require_int(skip, "The skip", 0, batch.tokens.shape[1] - 1)
    L = handle.structure.n_layers
    forward = L / (L + (L + 1) * readout_blocks(handle))  # the forward's share of the work
    told, blocks = stage(progress, 0.0, forward), itertools.count(1)
    # about two forwards' blocks: the states', and the block kwargs' forward of zeros (once per input shape)
    with handle.told_of_blocks(lambda k, n: told and told(min(1.0, next(blocks) / (2 * n)), f"{k} of {n} blocks")):
        states, logits = handle.exit_states(batch.tokens)
        resid = torch.stack([*states, handle.blocks.run(L - 1, states[-1])])  # h_0..h_L
    res = Residuals(resid, resid[:-1], logits, skip, batch.digest, parallel=handle.structure.parallel)
    change = 1 - token_cosine(resid[:-1, :, skip:].float(), resid[1:, :, skip:].float()).mean((1, 2))
    lens = logit_lens(handle, res, progress=stage(progress, forward, 1.0, "logit lens: "))
    return DepthProfile(lens, change, handle.structure.removed)


@dataclass(frozen=True)
class RoleChange:
    """A head's score for one role in the base and in the edited copy (None: the head is
    removed). had: the base head reaches the role's threshold; kept: the edited one does too."""

    layer: int
    head: int
    role: str
    base_score: float
    edited_score: float | None

    @property
    def had(self) -> bool:
        return self.base_score >= ROLE_THRESHOLDS[self.role]

    @property
    def kept(self) -> bool:
        return self.edited_score is not None and self.edited_score >= ROLE_THRESHOLDS[self.role]


def role_table(handle: ModelHandle, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Role scores [L, H] (ROLE_SCORES) of every head of `handle` on `tokens`, NaN for
    a head the copy no longer has. A copy with parts removed is read layer by layer."""
    L, H = handle.structure.n_layers, handle.structure.n_heads
    if not handle.structure.removed:
        roles = head_roles(handle, tokens)
        return {name: getattr(roles, name).float() for name in ROLE_SCORES}
    table = {name: torch.full((L, H), math.nan) for name in ROLE_SCORES}
    patterns = handle.record(tokens, [Point("pattern", layer) for layer in range(L)])
    for point, pattern in patterns.items():
        layer = point.layer
        heads = handle.heads.left(layer)
        roles = roles_from_patterns([pattern], tokens)
        for name in ROLE_SCORES:
            table[name][layer, heads] = getattr(roles, name)[0].float()
    return table


def role_changes(base: ModelHandle, edited: ModelHandle, batch: TextBatch, top: int = 2) -> list[RoleChange]:
    """For each role, the base's heads that have it (the Channels page's probe, drawn from
    the evaluation text) and at least its `top` highest-scoring heads, with their scores
    in `edited` on the same probe: lost roles first, then by role and score."""
    check_lm(base, "Head roles")
    top = require_int(top, "The heads shown per role", 0, 10**6)
    probe = role_probe(base, vocabulary=batch.tokens)
    roles = head_roles(base, probe)
    after = role_table(edited, probe)
    changes = []
    for role in ROLE_SCORES:
        scores = getattr(roles, role).float()
        order = scores.flatten().argsort(descending=True, stable=True).tolist()
        H = scores.shape[1]
        chosen = [i for rank, i in enumerate(order) if rank < top or scores.flatten()[i] >= ROLE_THRESHOLDS[role]]
        for i in chosen:
            layer, head = divmod(i, H)
            score = float(after[role][layer, head])
            changes.append(RoleChange(layer, head, role, float(scores[layer, head]),
                                      None if math.isnan(score) else score))
    return sorted(changes, key=lambda c: (not (c.had and not c.kept), ROLE_SCORES.index(c.role), -c.base_score))
