"""What each attention head does, measured on activations: role scores from one pass
recording the patterns of a repeated-token probe, every head's pattern on a prompt,
and interventions on a head's output z [batch, pos, head, d_head] (zero it, or scale
one direction its OV circuit writes) through `handle.hooks`, always removed.
Definitions: METHODS.md §2; the weight side is `analysis.channels.circuits`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from analysis.channels.circuits import ChannelsError, Circuits, Head, check_head, head_label
from analysis.predict import _encode
from analysis.redundancy.report import primary_metric
from lib.data import MAX_PROMPT_CHARS, TextBatch, check_batch, check_lm, check_text
from lib.errors import require_int
from lib.handle import ModelHandle, Point
from lib.lm_records import untold
from lib.metrics import Metrics, metrics_from_outputs
from lib.scoring import BaseOutputs, Logits

# ------------------------------------------------------------------ head roles (one pass)

REGIMES = ("global averaging", "metastable", "single pattern")
HOPFIELD_MASS = 0.9  # k = keys whose sorted weights reach this share of a query's attention
GLOBAL_FRACTION = 0.5  # mean k / (keys available) at or above this: the head averages over many keys
SINGLE_KEYS = 2.0  # mean k at or below this: one key (or two) carries the attention


@dataclass(frozen=True)
class HeadRoles:
    """What each head does on a batch of tokens, from its attention patterns. All [L, H].

    previous_token, duplicate_token, induction: TransformerLens `detect_head` ("mul")
    scores, the share of a head's attention on (q, q-1), on earlier copies of the query's
    token, and on the token after an earlier copy, averaged over sequences; sink: mean
    attention on position 0 (queries 1..); keys_90: mean k, the keys that carry 90% of a
    query's attention; key_fraction: mean k / (q + 1), the keys a causal query can see
    (queries 1..); regime: index into REGIMES (Hopfield view: global averaging when
    key_fraction >= GLOBAL_FRACTION, a single pattern when keys_90 <= SINGLE_KEYS,
    metastable in between).
    """

    previous_token: torch.Tensor
    duplicate_token: torch.Tensor
    induction: torch.Tensor
    sink: torch.Tensor
    keys_90: torch.Tensor
    key_fraction: torch.Tensor
    regime: torch.Tensor
    n_sequences: int
    seq_len: int

    SCORES = ("previous_token", "duplicate_token", "induction", "sink")

    def best(self, role: str) -> tuple[Head, float]:
        """The head scoring highest on `role` and its score."""
        scores = getattr(self, role)
        i = int(scores.argmax())
        return (i // scores.shape[1], i % scores.shape[1]), float(scores.flatten()[i])


# A head has a role when its detect_head score reaches the role's threshold here. One
# table for everything that names roles (the Channels graph's colours, its sentences), so
# they cannot disagree. A previous-token head can put nearly all its attention on q-1;
# duplicate-token and induction scores on the three-copy probe top out near 2/3 (the first
# copy's queries have no earlier copy to look at), hence the lower bar.
ROLE_THRESHOLDS: dict[str, float] = {"previous_token": 0.5, "duplicate_token": 0.3, "induction": 0.3}


def role_mask(roles: HeadRoles, role: str) -> torch.Tensor:
    """[L, H] True where a head's `role` score reaches ROLE_THRESHOLDS[role]."""
    return getattr(roles, role) >= ROLE_THRESHOLDS[role]


def head_role(roles: HeadRoles, head: Head) -> tuple[str, float] | None:
    """The role (a ROLE_THRESHOLDS key) `head` has with the highest score, and that score;
    None when it reaches no role's threshold."""
    held = [(role, float(getattr(roles, role)[head])) for role in ROLE_THRESHOLDS if role_mask(roles, role)[head]]
    return max(held, key=lambda held_role: held_role[1], default=None)


def role_probe(handle: ModelHandle, n: int = 8, block: int = 15, copies: int = 3, seed: int = 0,
               vocabulary: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens [n, 1 + copies * block]: BOS, then `copies` copies of a block of distinct
    random tokens drawn from `vocabulary` (ids; default every id that is not a special
    token), shortened to fit the context and the vocabulary. Three copies, as the zoo
    model cards use: with two, even a perfect induction head scores about 0.49 (only the
    second copy's queries have a target, but every query's attention counts). Drawing from
    the ids of the model's own evaluation text keeps the probe in distribution (a code
    model never saw most random bytes)."""
    check_lm(handle, "Attention channels")
    n, block = require_int(n, "The number of probe rows", 1, 4096), require_int(block, "The block length", 2, 10**6)
    copies, seed = require_int(copies, "The number of copies", 2, 64), require_int(seed, "The seed", 0, 2**63 - 1)
    tok = handle.tokenizer
    bos = getattr(tok, "bos_token_id", None)
    special = set(getattr(tok, "all_special_ids", ()) or ())
    ids = torch.arange(handle.structure.d_vocab) if vocabulary is None else vocabulary.flatten().unique()
    ids = torch.tensor([i for i in ids.tolist() if i not in special and 0 <= i < handle.structure.d_vocab])
    room = handle.structure.n_ctx - (bos is not None)
    block = min(block, room // copies, len(ids))
    if block < 2:
        raise ChannelsError("The context or the vocabulary is too small for a repeated-token probe "
                            f"({copies} copies of at least 2 distinct tokens).")
    gen = torch.Generator().manual_seed(seed)
    rows = [ids[torch.randperm(len(ids), generator=gen)[:block]].tolist() for _ in range(n)]
    return torch.tensor([([bos] if bos is not None else []) + row * copies for row in rows])


def check_tokens(handle: ModelHandle, tokens: torch.Tensor) -> None:
    check_lm(handle, "Attention channels")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ChannelsError("Tokens must be a tensor [batch, pos] of at least two positions.")
    check_batch(handle, TextBatch(tokens.long(), 0, False, "tokens"))


def _duplicates(tokens: torch.Tensor) -> torch.Tensor:
    """[b, q, k] True where key k < q holds the query's token (TransformerLens' duplicate-token pattern)."""
    same = tokens[:, :, None] == tokens[:, None, :]
    return same & torch.ones_like(same[0]).tril(-1)


def head_roles(handle: ModelHandle, tokens: torch.Tensor) -> HeadRoles:
    """Every head's role scores from one pass recording the patterns of `tokens` [b, pos]."""
    check_tokens(handle, tokens)
    L = handle.structure.n_layers
    cache = handle.record(tokens, [Point("pattern", l) for l in range(L)])
    return roles_from_patterns([cache[Point("pattern", l)] for l in range(L)], tokens)


def roles_from_patterns(patterns: Sequence[torch.Tensor], tokens: torch.Tensor) -> HeadRoles:
    """`HeadRoles` from each layer's patterns [b, H, q, k] on `tokens` [b, T]."""
    b, T = tokens.shape
    dup = _duplicates(tokens).float()  # [b, q, k]
    induction = torch.zeros_like(dup)
    induction[:, :, 1:] = dup[:, :, :-1]  # the key after an earlier copy
    targets = torch.stack([dup, induction], -1).reshape(b, T * T, 2)  # both detection patterns, flattened
    available = torch.arange(2, T + 1, dtype=torch.float32)  # keys a causal query q >= 1 sees
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("prev", "hits", "sink", "k", "frac")}
    for pattern in patterns:
        p = pattern.float()  # [b, H, q, k]
        flat = p.reshape(b, -1, T * T)
        total = flat.sum(-1, keepdim=True)  # [b, H, 1], T when every row sums to 1
        rows["prev"].append((p.diagonal(-1, -2, -1).sum(-1) / total[..., 0]).mean(0))
        rows["hits"].append((torch.bmm(flat, targets) / total).mean(0))  # [H, 2]: duplicate, induction
        rows["sink"].append(p[:, :, 1:, 0].mean((0, 2)))
        k = _keys_for_mass(p)  # [b, H, q-1]
        rows["k"].append(k.mean((0, 2)))
        rows["frac"].append((k / available).mean((0, 2)))
    keys, frac, hits = torch.stack(rows["k"]), torch.stack(rows["frac"]), torch.stack(rows["hits"])
    regime = torch.where(frac >= GLOBAL_FRACTION, 0, torch.where(keys <= SINGLE_KEYS, 2, 1))
    return HeadRoles(torch.stack(rows["prev"]), hits[..., 0], hits[..., 1], torch.stack(rows["sink"]), keys, frac,
                     regime, int(b), int(T))


def _keys_for_mass(p: torch.Tensor) -> torch.Tensor:
    """Hopfield k for each query q >= 1 of patterns [b, H, q, k]: how many of its largest
    weights reach HOPFIELD_MASS of its attention, [b, H, T-1]. NumPy sorts the rows: its
    vectorised sort is some 20x faster than torch.sort on CPU (1.5M weights: ~5 ms vs ~140 ms)."""
    weights = p[:, :, 1:].detach().cpu().numpy()
    mass = np.cumsum(np.sort(weights, axis=-1)[..., ::-1], axis=-1, dtype=np.float64)  # largest first
    return torch.from_numpy((mass < HOPFIELD_MASS * mass[..., -1:]).sum(-1) + 1).float()


# ------------------------------------------------------------------ patterns on a prompt


MAX_PROMPT_TOKENS = 96  # a pattern over more tokens than this is unreadable as a heat map


@dataclass(frozen=True)
class PromptTokens:
    """A prompt as the model reads it. ids: [1, T], BOS first; labels: [T] each token's
    text (BOS as "BOS"); unknown: prompt pieces the vocabulary cannot represent (fed as
    its unknown/BOS token); dropped: tokens cut from the end to stay within the limit."""

    ids: torch.Tensor
    labels: list[str]
    unknown: list[str]
    dropped: int


def prompt_tokens(handle: ModelHandle, prompt: str, max_tokens: int = MAX_PROMPT_TOKENS) -> PromptTokens:
    """Tokenize `prompt` (BOS first), keeping its first tokens up to `max_tokens` and the context."""
    check_lm(handle, "Attention channels")
    check_text(prompt, "prompt", MAX_PROMPT_CHARS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ChannelsError(f"The prompt's token limit is a whole number >= 1, not {max_tokens!r}; "
                            f"pass at least 1 (the default is {MAX_PROMPT_TOKENS}).")
    tok = handle.tokenizer
    ids, unknown = _encode(tok, prompt)
    if not prompt.strip() or not ids:
        raise ChannelsError("The prompt is empty. Type some text to see the heads' attention on it.")
    bos = getattr(tok, "bos_token_id", None)
    room = min(max_tokens, handle.structure.n_ctx) - (bos is not None)
    kept = ids[:room]
    ids_bos = ([bos] if bos is not None else []) + kept
    labels = ["BOS" if i == bos else tok.decode([i], clean_up_tokenization_spaces=False) for i in ids_bos]
    return PromptTokens(torch.tensor([ids_bos]), labels, [u for u in unknown[:room] if u is not None],
                        len(ids) - len(kept))


def attention_patterns(handle: ModelHandle, tokens: torch.Tensor) -> torch.Tensor:
    """Every head's attention pattern on one prompt, tokens [1, T] -> [L, H, T, T] (query, key)."""
    check_tokens(handle, tokens)
    L = handle.structure.n_layers
    cache = handle.record(tokens[:1], [Point("pattern", l) for l in range(L)])
    return torch.stack([cache[Point("pattern", l)][0].float() for l in range(L)])


# ------------------------------------------------------------------ interventions


@dataclass(frozen=True)
class HeadEdit:
    """Scale one head's output by `alpha` (no components: the whole head; alpha 0 cuts it),
    or only its parts along the directions v_i its OV writes, for i in `components`
    (indices into the SVD, strongest first): r <- r + (alpha - 1) sum_i (r · v_i) v_i."""

    layer: int
    head: int
    components: tuple[int, ...] = ()
    alpha: float = 0.0

    @property
    def label(self) -> str:
        what = head_label((self.layer, self.head))
        if self.components:
            what += f" component{'s' if len(self.components) > 1 else ''} {', '.join(map(str, self.components))}"
        return f"zero {what}" if self.alpha == 0 else f"scale {what} by {self.alpha:g}"


def check_edit(c: Circuits, edit: HeadEdit) -> None:
    check_head(c, (edit.layer, edit.head), "edited head")
    r = c.ov_S.shape[-1]
    wrong = [i for i in edit.components if not (isinstance(i, int) and 0 <= i < r)]
    if wrong or len(set(edit.components)) != len(edit.components):
        raise ChannelsError(f"A head's OV has components 0..{r - 1}, each named once; {list(edit.components)} "
                            "does not fit.")
    if not isinstance(edit.alpha, (int, float)) or not math.isfinite(edit.alpha):
        raise ChannelsError(f"The scale factor must be a finite number, not {edit.alpha!r}.")


def _edit_hook(c: Circuits, edits: Sequence[HeadEdit]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A hook on one layer's z [b, pos, H, r]. Scaling component i changes z by
    (alpha - 1)(z · W_O v_i) p_i, so the head's output r = z W_O changes by
    (alpha - 1)(r · v_i)(v_i + m 1): exactly the METHODS formula where W_O is not
    centred (RMSNorm models), and up to a multiple of the all-ones direction, which the
    next LayerNorm subtracts, where TransformerLens centred it. The v_i are orthonormal,
    so components edited one after another equal all edited at once."""

    def hook(z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        for e in edits:
            if not e.components:
                z[:, :, e.head] *= e.alpha
            for i in e.components:
                w_in = c.ov_in[e.layer, e.head, :, i].to(z.dtype)  # [r]
                p = c.ov_out[e.layer, e.head, :, i].to(z.dtype)  # [r]
                z[:, :, e.head] += (e.alpha - 1) * (z[:, :, e.head] @ w_in)[..., None] * p
        return z

    return hook


@contextmanager
def editing(handle: ModelHandle, c: Circuits, edits: Sequence[HeadEdit]) -> Iterator[None]:
    """Inside, the model runs with `edits` applied to the heads' outputs (hooks, always
    removed on exit, also when the body raises; the weights are untouched)."""
    for e in edits:
        check_edit(c, e)
    layers = sorted({e.layer for e in edits})
    with handle.hooks([(Point("z", l), _edit_hook(c, [e for e in edits if e.layer == l])) for l in layers]):
        yield


@dataclass(frozen=True)
class Intervention:
    """One edit measured: `metric` (the batch's quality measure, see `higher_is_better`)
    before and after on the evaluation batch (`after` also has KL and top-1 agreement to
    the unedited model), and the reader head's attention pattern on a prompt before and
    after, [T, T] (query, key) each."""

    edit: HeadEdit
    reader: Head
    metric: str
    higher_is_better: bool
    before: Metrics
    after: Metrics
    pattern_before: torch.Tensor
    pattern_after: torch.Tensor

    @property
    def change(self) -> float:
        return getattr(self.after, self.metric) - getattr(self.before, self.metric)


def intervene(handle: ModelHandle, batch: TextBatch, c: Circuits, edit: HeadEdit, reader: Head,
              prompt: torch.Tensor, base: Logits | BaseOutputs | None = None,
              before: Metrics | None = None) -> Intervention:
    """Apply `edit`, re-measure the evaluation metric on `batch` and the `reader`'s pattern
    on `prompt` [1, T]. base: the unedited outputs on `batch`, if already computed (raw or
    prepared: `prepare_base`); before: their metrics (`metrics_from_outputs`), if known."""
    check_batch(handle, batch)
    check_tokens(handle, prompt)
    check_edit(c, edit)
    check_head(c, reader, "reader")
    metric, higher = primary_metric(batch)
    if base is None:
        base = handle.forward(batch.tokens)
    point = Point("pattern", reader[0])
    with untold():  # the prompt's two short forwards: a bar counts the batch's
        pattern_before = handle.record(prompt[:1], [point])[point][0, reader[1]].float()
    with editing(handle, c, [edit]):
        edited = handle.forward(batch.tokens)
        with untold():
            pattern_after = handle.record(prompt[:1], [point])[point][0, reader[1]].float()
    if before is None:
        logits = base.logits if isinstance(base, BaseOutputs) else base
        before = metrics_from_outputs(logits, batch, handle.n_params, handle.size_bits)
    after = metrics_from_outputs(edited, batch, handle.n_params, handle.size_bits, base=base)
    return Intervention(edit, reader, metric, higher, before, after, pattern_before, pattern_after)
