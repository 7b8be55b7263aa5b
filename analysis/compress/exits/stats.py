"""The one pass behind early exits (METHODS.md §6): every depth's state from one forward
(`ModelHandle.exit_states`), each checked depth read out once in class blocks into
per-token statistics [K, N] (max probability, entropy, argmax, log probability of the
target) plus the state saturation cos(h_l, h_{l-1}). Every criterion and threshold is
computed from these (`rule`); the exiting forward of an edited copy computes the
same statistics the same way, so both decide alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from analysis.compress.exits.cost import CostModel, image_cost, lm_cost
from analysis.compress.exits.readouts import exit_depths, exit_lens
from analysis.lens import ExitLens, Reader
from lib.data import Batch, TextBatch, check_batch
from lib.handle import ModelHandle
from lib.metrics import model_inputs
from lib.progress import Progress

BLOCK_ELEMENTS = 1 << 22  # logits per class block (16 MB): few enough blocks that per-op thread overhead stays small


def class_blocks(reader: Reader, depth: int, state: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """The logits of `state` [N, ...] read at `depth`, as class blocks (first column,
    [N, w]) computed one matmul at a time into a reused buffer when the readout is affine."""
    n = state.shape[0]
    parts = reader.affine(depth, state)
    width = max(128, BLOCK_ELEMENTS // max(n, 1))
    if parts is None:
        yield from sliced(reader.logits(depth, state), width)
        return
    x, weight, bias = parts
    buffer = torch.empty(n * min(width, weight.shape[0]))
    for start in range(0, weight.shape[0], width):
        w = weight[start:start + width]
        z = buffer[: n * w.shape[0]].view(n, w.shape[0])
        if bias is None:
            torch.mm(x, w.T, out=z)
        else:
            torch.addmm(bias[start:start + width], x, w.T, out=z)
        yield start, z


def sliced(logits: torch.Tensor, width: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, logits.shape[-1], width):
        yield start, logits[:, start:start + width].float()


@dataclass(frozen=True)
class Summary:
    """Per-token softmax statistics [N]: max probability, entropy (nats), argmax, log
    probability of the target (None without targets), <p_ref, z> (None without p_ref)."""

    max_prob: torch.Tensor
    entropy: torch.Tensor
    argmax: torch.Tensor
    logprob: torch.Tensor | None
    ref_dot: torch.Tensor | None = None
    lse: torch.Tensor | None = None


def summarise(blocks: Iterator[tuple[int, torch.Tensor]], n: int, targets: torch.Tensor | None = None,
               p_ref: torch.Tensor | None = None) -> Summary:
    """Softmax statistics from class blocks by an online log-sum-exp: with m the running
    max, s = sum exp(z - m) and t = sum exp(z - m) z (rescaled by exp(m_old - m_new) when m
    grows); lse = m + log s, entropy = lse - t / s, max probability exp(m - lse)."""
    m = torch.full((n,), -math.inf)
    s, t = torch.zeros(n), torch.zeros(n)
    best = torch.zeros(n, dtype=torch.long)
    target_logit = torch.zeros(n) if targets is not None else None
    ref_dot = torch.zeros(n) if p_ref is not None else None
    scratch = None
    for start, z in blocks:
        block_max, block_arg = z.max(-1)
        best = torch.where(block_max > m, block_arg + start, best)
        new_m = torch.maximum(m, block_max)
        scale = torch.exp(m - new_m)
        if scratch is None or scratch.numel() < z.numel():
            scratch = torch.empty(z.numel())
        e = torch.sub(z, new_m[:, None], out=scratch[: z.numel()].view(z.shape)).exp_()
        s = s * scale + e.sum(-1)
        t = t * scale + torch.linalg.vecdot(e, z)
        m = new_m
        if targets is not None:
            inside = (targets >= start) & (targets < start + z.shape[1])
            rows = inside.nonzero().squeeze(1)
            target_logit[rows] = z[rows, targets[rows] - start]
        if p_ref is not None:
            ref_dot += torch.linalg.vecdot(p_ref[:, start:start + z.shape[1]], z)
    lse = m + s.log()
    return Summary((m - lse).exp(), lse - t / s, best, None if targets is None else target_logit - lse,
                    ref_dot, lse)


@dataclass(frozen=True)
class DepthTable:
    """Scores at the K checked depths, [K, N] each (max_prob, entropy, argmax, logprob:
    None when not read out; saturation: -inf where consecutive states differ in shape)."""

    max_prob: torch.Tensor | None
    entropy: torch.Tensor | None
    argmax: torch.Tensor | None
    logprob: torch.Tensor | None
    saturation: torch.Tensor


def token_rows(state: torch.Tensor, lead: int) -> torch.Tensor:
    """[*lead token dims, ...] -> [N, ...]: one row per token (LM, lead 2) or image (lead 1)."""
    return state.reshape(-1, *state.shape[lead:])


def depth_table(reader: Reader, depths: tuple[int, ...], states: list[torch.Tensor], lead: int,
                 targets: torch.Tensor | None, readouts: bool, progress: Progress | None = None) -> DepthTable:
    """The scores of every checked depth from one pass's states, whose first `lead` dims
    index tokens (the same computation for the one-pass curves and the exiting forward, so
    both decide alike)."""
    n = math.prod(states[0].shape[:lead])
    rows: list[Summary] = []
    saturation = []
    for i, depth in enumerate(depths):
        here, before = token_rows(states[depth], lead), token_rows(states[depth - 1], lead)
        if here.shape == before.shape:
            saturation.append(F.cosine_similarity(here.reshape(n, -1).float(), before.reshape(n, -1).float(),
                                                  dim=-1, eps=1e-12))
        else:
            saturation.append(torch.full((n,), -math.inf))
        if readouts:
            rows.append(summarise(class_blocks(reader, depth, here), n, targets))
        if progress:
            progress((i + 1) / len(depths), f"exits: reading out depth {depth}")
    if not readouts:
        return DepthTable(None, None, None, None, torch.stack(saturation))
    logprob = torch.stack([r.logprob for r in rows]) if targets is not None else None
    return DepthTable(torch.stack([r.max_prob for r in rows]), torch.stack([r.entropy for r in rows]),
                  torch.stack([r.argmax for r in rows]), logprob, torch.stack(saturation))


def patience_counts(argmax: torch.Tensor) -> torch.Tensor:
    """Consecutive checked depths with an unchanged argmax: [K, N] -> [K, N] (0 at the first)."""
    counts = torch.zeros(argmax.shape)
    for i in range(1, argmax.shape[0]):
        counts[i] = (counts[i - 1] + 1) * (argmax[i] == argmax[i - 1])
    return counts


def criterion_scores(table: DepthTable, criterion: str) -> tuple[torch.Tensor, float]:
    """(scores [K, N], sign): a token exits at the first depth where sign · score >= sign · t."""
    if criterion == "max_prob":
        return table.max_prob, 1.0
    if criterion == "entropy":
        return -table.entropy, -1.0
    if criterion == "patience":
        return patience_counts(table.argmax), 1.0
    return table.saturation, 1.0


def exit_index(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """For scores [K, N] and thresholds [T]: the index of each token's first depth whose
    score is >= the threshold, K where none is: [T, N]. The running maximum over depth is
    nondecreasing, so the count of its entries below t is that index."""
    running = scores.cummax(0).values.T.contiguous()  # [N, K]
    wanted = thresholds.to(running.dtype)[None].expand(running.shape[0], -1).contiguous()  # [N, T]
    return torch.searchsorted(running, wanted, side="left").T


# ---------------------------------------------------------------------- the one pass


@dataclass(frozen=True, eq=False)
class ExitStats:
    """Everything the exit criteria read, from one pass over a batch.

    depths: the K checked depths; n_layers: the model's depth (its own output is depth
    n_layers). max_prob, entropy, saturation: [K, N]; argmax, logprob: [K + 1, N] (row K:
    the model's own output) the top class and the log probability of the target (next
    token or label); scored: [N] positions that have a target; answers: [N] positions
    where accuracy is measured (the task's answers, every image), None for plain text.
    """

    lens: str
    depths: tuple[int, ...]
    n_layers: int
    max_prob: torch.Tensor
    entropy: torch.Tensor
    saturation: torch.Tensor
    argmax: torch.Tensor
    logprob: torch.Tensor
    targets: torch.Tensor
    scored: torch.Tensor
    answers: torch.Tensor | None
    cost: CostModel

    def table(self) -> DepthTable:
        return DepthTable(self.max_prob, self.entropy, self.argmax[:-1], self.logprob[:-1], self.saturation)


def _targets(batch: Batch, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(targets [N], scored [N], answers [N] or None) in the row order of `_flat`."""
    if isinstance(batch, TextBatch):
        tokens = batch.tokens
        targets = torch.zeros_like(tokens)
        targets[:, :-1] = tokens[:, 1:]  # position p predicts token p + 1
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        scored[:, :-1] = True
        answers = None
        if batch.answer_mask is not None:
            answers = torch.zeros_like(scored)
            answers[:, :-1] = batch.answer_mask[:, 1:]
            answers = answers.reshape(n)
        return targets.reshape(n), scored.reshape(n), answers
    return batch.labels, torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)


@torch.no_grad()
def collect_exit_stats(handle: ModelHandle, batch: Batch, lens: str | ExitLens = "logit",
                       progress: Progress | None = None) -> ExitStats:
    """One forward through every layer, one readout per checked depth: the statistics
    every exit criterion and threshold is computed from. A tuned lens or exit heads not yet
    trained for this model are trained first (`exit_lens`)."""
    check_batch(handle, batch)
    chosen = exit_lens(handle, lens, _part(progress, 0.0, 0.5))
    readout = Reader(handle, chosen)
    depths = exit_depths(handle)
    states, output = handle.exit_states(model_inputs(batch))
    n = math.prod(output.shape[:-1])
    targets, scored, answers = _targets(batch, n)
    table = depth_table(readout, depths, states, output.dim() - 1, targets, True, _part(progress, 0.5, 1.0))
    final = summarise(sliced(output.reshape(n, -1), max(128, BLOCK_ELEMENTS // n)), n, targets)
    cost = (lm_cost(handle, batch.tokens.shape[1], chosen.kind) if isinstance(batch, TextBatch)
            else image_cost(handle, states, output))
    return ExitStats(chosen.kind, depths, len(states), table.max_prob, table.entropy, table.saturation,
                     torch.cat([table.argmax, final.argmax[None]]), torch.cat([table.logprob, final.logprob[None]]),
                     targets, scored, answers, cost)


def _part(progress: Progress | None, start: float, end: float) -> Progress | None:
    """`progress` mapped onto [start, end] of a longer task."""
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (end - start) * fraction, message)


@dataclass(frozen=True)
class LensKL:
    """How close a lens is to the model's own output at each depth.

    depths: [D] the depths read (LM: 0..L; classifier: its exit stages, then n_layers);
    kl: [D] mean KL(p_final || p_depth) in nats over the batch's tokens but the first of
    each window (BOS), or over its images; 0 at the last depth.
    """

    lens: str
    depths: tuple[int, ...]
    kl: torch.Tensor


@torch.no_grad()
def lens_kl(handle: ModelHandle, batch: Batch, lens: str | ExitLens = "logit",
            progress: Progress | None = None) -> LensKL:
    """Mean KL to the final layer of every depth's readout through `lens`, from one pass;
    each depth costs one blocked readout (KL = sum p log p - <p, z> + lse(z))."""
    check_batch(handle, batch)
    chosen = exit_lens(handle, lens, _part(progress, 0.0, 0.5))
    reader = Reader(handle, chosen)
    states, output = handle.exit_states(model_inputs(batch))
    lead = output.dim() - 1
    keep = slice(1, None) if lead == 2 else slice(None)  # LMs: BOS predicts nothing worth comparing
    rows = lambda t: token_rows(t[:, keep], lead)  # noqa: E731
    final = rows(output).float()
    log_p = torch.log_softmax(final, -1)
    p = log_p.exp()  # [n, classes], the reference of every KL
    neg_entropy = torch.linalg.vecdot(p, log_p)
    depths = tuple(range(len(states))) if lead == 2 else exit_depths(handle)
    n = final.shape[0]
    kl = []
    for i, depth in enumerate(depths):
        summary = summarise(class_blocks(reader, depth, rows(states[depth])), n, p_ref=p)
        kl.append((neg_entropy - summary.ref_dot + summary.lse).mean().clamp_min(0))
        if progress:
            progress(0.5 + 0.5 * (i + 1) / len(depths), f"lens KL: depth {depth}")
    return LensKL(chosen.kind, depths + (len(states),), torch.stack(kl + [torch.tensor(0.0)]))
