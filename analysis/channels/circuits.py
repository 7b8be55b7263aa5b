"""Attention communication channels: what each head does and which heads talk to which.
Definitions: METHODS.md §2.

Weights (no forward pass): each head's OV circuit W_V W_O and QK circuit W_Q W_K^T,
[d, d] of rank <= d_head, in TransformerLens' row-vector convention with LayerNorm
folded in (`handle.heads.circuits()`). Everything is computed from d_head x d_head
Gram matrices of the factors, never from a dense d x d product: for M = A B,
A^T A = T_A^T T_A and B B^T = T_B^T T_B give M = Q_A (T_A T_B^T) Q_B^T with Q_A, Q_B
orthonormal, so norms, singular values and products of M come from [d_head, d_head]
cores (the cheap form of TransformerLens' `FactoredMatrix`).

What heads do on activations (roles, patterns, interventions) is `analysis.channels.heads`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lib.data import check_lm
from lib.errors import AnalysisError, require_type
from lib.handle import ModelHandle
from lib.progress import Progress

MODES = ("Q", "K", "V")
MODE_NAMES = {"Q": "Q-composition (writer feeds the reader's queries)",
              "K": "K-composition (writer feeds the reader's keys)",
              "V": "V-composition (writer feeds the reader's values)"}
Head = tuple[int, int]  # (layer, head)


class ChannelsError(AnalysisError):
    """The model or the request cannot be analysed this way; the message says why."""


# ------------------------------------------------------------------ circuits (weights only)


LayerFactors = Callable[[int], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Circuits:
    """Every head's OV and QK circuit, LayerNorm folded in. r = d_head.

    factors: layer -> that layer's factors, read from the model when asked (never all at
    once): W_Q [H, d, r], W_K, W_V [H_kv, d, r] (H_kv < H: grouped-query attention, each
    key/value head serving H / H_kv query heads in turn), W_O [H, r, d]; OV = W_V W_O,
    QK = W_Q W_K^T (the stacked properties `W_Q` ... give every layer's, K and V repeated).
    ov_S: [L, H, r] singular values of OV, descending; ov_V: [L, H, d, r] its right
    singular vectors, the directions each head writes (OV = U diag(S) V^T; signs are
    arbitrary); ov_in: [L, H, r, r] column i = W_O v_i, so the component of a head's
    output along v_i is z · (W_O v_i) for its z [r]; ov_out: [L, H, r, r] column i = p_i
    with W_O^T p_i = v_i, the z change that writes along v_i; qk_S: [L, H, r] singular
    values of QK; n_kv_heads: key/value heads per layer; positional: "rotary", "standard", ...
    """

    factors: LayerFactors
    ov_S: torch.Tensor
    ov_V: torch.Tensor
    ov_in: torch.Tensor
    ov_out: torch.Tensor
    qk_S: torch.Tensor
    n_kv_heads: int
    positional: str

    @property
    def n_layers(self) -> int:
        return int(self.ov_V.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.ov_V.shape[1])

    @property
    def d_model(self) -> int:
        return int(self.ov_V.shape[2])

    @property
    def rotary(self) -> bool:
        """Rotary models rotate queries and keys by position between W_Q and W_K, so the
        weight-only QK circuit (and Q/K composition) leaves out what position does."""
        return self.positional == "rotary"

    @property
    def grouped(self) -> bool:
        return self.n_kv_heads < self.n_heads

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        """One layer's factors with K and V repeated to every query head: [H, ...] each."""
        return {name: per_query_head(t, self.n_heads) for name, t in self.factors(layer).items()}

    def _stacked(self, name: str) -> torch.Tensor:
        return torch.stack([self.layer(layer)[name] for layer in range(self.n_layers)])

    W_Q = property(lambda self: self._stacked("W_Q"), doc="[L, H, d, r] every layer's W_Q (built when read)")
    W_K = property(lambda self: self._stacked("W_K"), doc="[L, H, d, r] W_K, repeated to every query head")
    W_V = property(lambda self: self._stacked("W_V"), doc="[L, H, d, r] W_V, repeated to every query head")
    W_O = property(lambda self: self._stacked("W_O"), doc="[L, H, r, d] every layer's W_O")


def per_query_head(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A layer's factor [H_kv, ...] repeated to its `n_heads` query heads (as it is when H_kv = H)."""
    return t if t.shape[0] == n_heads else t.repeat_interleave(n_heads // t.shape[0], dim=0)


HEADS_AT_ONCE = 64  # head matrices taken to float64 at a time: [64, d, r], not every layer's at once


def _per_heads(*tensors: torch.Tensor) -> zip:
    """Matching chunks of HEADS_AT_ONCE head matrices of tensors [..., x, y] (same leading dims)."""
    return zip(*(t.reshape(-1, *t.shape[-2:]).split(HEADS_AT_ONCE) for t in tensors))


def _gram_root(m: torch.Tensor, rows: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For m [..., n, r] (or, with rows, m [..., r, n] read as its transpose): the Gram
    matrix G = m^T m [..., r, r] = E diag(lam) E^T and its root T = diag(sqrt(lam)) E^T,
    so T^T T = G. Returns (T, E, lam), float64, lam >= 0 ascending. Accumulated in float64
    a chunk of heads at a time (a float64 copy of a large model's factors would be GiBs)."""
    grams = []
    for (chunk,) in _per_heads(m):
        chunk = chunk.double()
        grams.append(chunk @ chunk.transpose(-2, -1) if rows else chunk.transpose(-2, -1) @ chunk)
    gram = torch.cat(grams).reshape(*m.shape[:-2], *grams[0].shape[-2:])
    lam, vecs = torch.linalg.eigh(gram)
    lam = lam.clamp_min(0)
    return lam.sqrt()[..., :, None] * vecs.transpose(-2, -1), vecs, lam


def _inverse_sqrt(lam: torch.Tensor) -> torch.Tensor:
    """1/sqrt(lam) where lam is not negligible against the largest, else 0 (a rank-deficient factor)."""
    keep = lam > lam.amax(-1, keepdim=True) * 1e-12
    return torch.where(keep, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))


def factored_svd(a: torch.Tensor, b: torch.Tensor, values_only: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """SVD of M = a b (a [..., d, r], b [..., r, d]) from r x r cores: (S [..., r]
    descending, V [..., d, r] right singular vectors, W [..., r, r] with column i = b v_i,
    P [..., r, r] with b^T P = V), computed in float64; V comes back in float32 (it is as
    large as the factors), the rest in float64. values_only: S alone (V, W, P are None)."""
    t_a, _, _ = _gram_root(a)
    t_b, e_b, lam_b = _gram_root(b, rows=True)  # b = T_b^T Q_b^T, Q_b = b^T E_b diag(lam_b^-1/2)
    _, s, vh = torch.linalg.svd(t_a @ t_b.transpose(-2, -1))  # core [r, r]
    if values_only:
        return s, None, None, None
    p = e_b @ (_inverse_sqrt(lam_b)[..., :, None] * vh.transpose(-2, -1))  # [.., r, r]
    vs, ws = [], []
    for b_chunk, p_chunk in _per_heads(b, p):
        v = b_chunk.double().transpose(-2, -1) @ p_chunk  # [n, d, r]
        ws.append(b_chunk.double() @ v)
        vs.append(v.float())
    lead = b.shape[:-2]
    return s, torch.cat(vs).reshape(*lead, b.shape[-1], p.shape[-1]), torch.cat(ws).reshape(*lead, *ws[0].shape[-2:]), p


def circuits(handle: ModelHandle, progress: Progress | None = None) -> Circuits:
    """Every head's circuits and their spectra (weights only; cache per fingerprint), a
    layer at a time: what is kept is the spectra and the directions heads write (`ov_V`),
    never a copy of the attention weights."""
    check_lm(handle, "Attention channels")
    f = handle.heads.circuits()
    return from_layers(f["layer"], f["n_layers"], f["n_heads"], f["d_model"], f["n_kv_heads"], f["positional"],
                       progress)


def from_factors(w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor,
                 n_kv_heads: int | None = None, positional: str = "standard") -> Circuits:
    """`Circuits` from stacked factors (W_Q [L, H, d, r], W_K, W_V [L, H or H_kv, d, r], W_O [L, H, r, d])."""
    L, H, d = w_q.shape[:3]
    factors = {"W_Q": w_q.float(), "W_K": w_k.float(), "W_V": w_v.float(), "W_O": w_o.float()}
    return from_layers(lambda layer: {name: t[layer] for name, t in factors.items()}, L, H, d,
                       n_kv_heads or H, positional)


def from_layers(factors: LayerFactors, n_layers: int, n_heads: int, d_model: int, n_kv_heads: int,
                positional: str, progress: Progress | None = None) -> Circuits:
    """`Circuits` from a reader of each layer's factors: the spectra one layer at a time."""
    kept: dict[str, list[torch.Tensor]] = {"S": [], "in": [], "out": [], "qk": []}
    ov_v = None
    for layer in range(n_layers):
        f = {name: per_query_head(t, n_heads) for name, t in factors(layer).items()}
        s, v, w_in, p = factored_svd(f["W_V"], f["W_O"])
        if ov_v is None:  # filled in place: never a list of every layer's and a stacked copy at once
            ov_v = torch.empty(n_layers, *v.shape, dtype=v.dtype, device=v.device)
        ov_v[layer] = v
        kept["qk"].append(factored_svd(f["W_Q"], f["W_K"].transpose(-2, -1), values_only=True)[0].float())
        for name, value in (("S", s), ("in", w_in), ("out", p)):
            kept[name].append(value.float())
        if progress:
            progress((layer + 1) / n_layers, f"layer {layer} of {n_layers}")
    stack = {name: torch.stack(values) for name, values in kept.items()}
    return Circuits(factors, stack["S"], ov_v, stack["in"], stack["out"], stack["qk"], n_kv_heads, positional)


def reader_factor(c: Circuits, mode: str, layer: int) -> torch.Tensor:
    """Y [H, d, r] of `layer` with ||x^T M||= ||x^T Y|| for every x and ||M||_F = ||Y||_F,
    where M is what a reader reads a writer through: QK (Q), QK^T (K) or OV (V) = A B^T
    (A, B [d, r]); with B^T B = T^T T, Y = A T^T."""
    check_mode(mode)
    f = c.layer(layer)
    a, b = {"Q": (f["W_Q"], f["W_K"]), "K": (f["W_K"], f["W_Q"]), "V": (f["W_V"], f["W_O"].transpose(-2, -1))}[mode]
    t, _, _ = _gram_root(b)
    t = t.transpose(-2, -1)
    out = torch.cat([(a_chunk.double() @ t_chunk).float() for a_chunk, t_chunk in _per_heads(a, t)])
    return out.reshape(*a.shape[:-1], t.shape[-1])


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ChannelsError(f"A composition mode is one of {', '.join(MODES)}, not {mode!r}.")


@dataclass(frozen=True)
class Composition:
    """Composition scores of every writer head (l1, h1) into every reader (l2, h2), l1 < l2.

    scores: mode -> [L, H, L, H] ||OV_w M_r||_F / (||OV_w||_F ||M_r||_F) with M_r the
    reader's QK (Q), QK^T (K) or OV (V); 0 where l1 >= l2 (see `valid`). Random matrices
    score about `baseline` = 1/sqrt(d); `relative` divides by it. rotary: the Q and K
    scores leave out the position-dependent rotation (approximate).
    """

    scores: dict[str, torch.Tensor]
    d_model: int
    rotary: bool = False

    @property
    def baseline(self) -> float:
        return 1 / math.sqrt(self.d_model)

    def relative(self, mode: str) -> torch.Tensor:
        check_mode(mode)
        return self.scores[mode] / self.baseline

    @property
    def valid(self) -> torch.Tensor:
        """[L, H, L, H] True where the writer's layer is before the reader's."""
        L, H = self.scores[next(iter(self.scores))].shape[:2]
        layer = torch.arange(L)
        return (layer[:, None, None, None] < layer[None, None, :, None]).expand(L, H, L, H)

    def strongest(self, mode: str, n: int) -> list[Channel]:
        """The n highest-scoring writer/reader pairs of `mode`, strongest first."""
        rel = self.relative(mode).masked_fill(~self.valid, -math.inf).flatten()
        n = max(0, min(n, int(self.valid.sum())))
        L, H = self.scores[mode].shape[:2]
        out = []
        for i in rel.topk(n).indices.tolist():
            l1, h1, l2, h2 = i // (H * L * H), i // (L * H) % H, i // H % L, i % H
            out.append(Channel((l1, h1), (l2, h2), mode, float(self.scores[mode][l1, h1, l2, h2]), self.baseline))
        return out


@dataclass(frozen=True)
class Channel:
    """One writer -> reader pair: score and score / baseline."""

    writer: Head
    reader: Head
    mode: str
    score: float
    baseline: float

    @property
    def relative(self) -> float:
        return self.score / self.baseline

    @property
    def writer_label(self) -> str:
        return head_label(self.writer)

    @property
    def reader_label(self) -> str:
        return head_label(self.reader)

    @property
    def label(self) -> str:
        return f"{self.writer_label} → {self.reader_label} ({self.mode})"


def head_label(head: Head) -> str:
    return f"L{head[0]}H{head[1]}"


PRODUCT_ELEMENTS = 1 << 24  # products of writers with one reader layer, this many floats (64 MB) at a time


def composition_scores(c: Circuits, modes: Sequence[str] = MODES, progress: Progress | None = None) -> Composition:
    """All writer/reader composition scores. With X_w = diag(S_w) V_w^T [r, d] (so
    ||OV_w x|| and ||OV_w||_F are X_w's), ||OV_w M_r||_F = ||X_w Y_r||_F (`reader_factor`):
    each reader layer's Y once, multiplied by the X of every earlier writer layer (a few
    writer layers at a time, PRODUCT_ELEMENTS), then block norms: nothing of every layer's
    size is made beyond the kept `ov_V`."""
    require_type(c, Circuits, "The circuits")
    require_type(modes, (list, tuple), "The composition modes")
    if not modes:
        raise ChannelsError(f"Name at least one composition mode ({', '.join(MODES)}).")
    for mode in modes:
        check_mode(mode)
    L, H, r = c.n_layers, c.n_heads, c.ov_S.shape[-1]
    x_norm = c.ov_S.norm(dim=-1)  # [L, H]
    out = {}
    per = max(1, PRODUCT_ELEMENTS // (H * r) ** 2)  # writer layers per product
    for m, mode in enumerate(modes):
        scores = torch.zeros(L, H, L, H)
        for l2 in range(1, L):  # each reader layer's factor once, against every earlier writer layer
            if progress:
                progress((m * (L - 1) + l2 - 1) / (len(modes) * (L - 1)), f"{mode}-composition, reader layer {l2}")
            y = reader_factor(c, mode, l2)  # [H, d, r]
            y_norm = y.norm(dim=(-2, -1))  # [H]
            y_cols = y.permute(1, 0, 2).reshape(c.d_model, H * r)  # [d, H r]
            for first in range(0, l2, per):
                last = min(l2, first + per)
                x = (c.ov_S[first:last, ..., :, None] * c.ov_V[first:last].transpose(-2, -1)).reshape(-1, c.d_model)
                norms = (x @ y_cols).square_().reshape(last - first, H, r, H, r).sum((2, 4)).sqrt_()  # [layers, H, H]
                scores[first:last, :, l2] = norms / (x_norm[first:last, :, None] * y_norm[None, None])
        out[mode] = scores.nan_to_num(0.0)  # a zeroed head has norm 0: no composition
    return Composition(out, c.d_model, c.rotary)


# ------------------------------------------------------------------ low-rank channels


@dataclass(frozen=True)
class ChannelComponents:
    """A writer's OV split into rank-1 components s_i u_i v_i^T, each scored against one
    reader ("Talking Heads"): scores [r] = ||v_i^T M|| / ||M||_F, so a component writing
    in a direction the reader ignores scores 0, a random one about `baseline`.
    singular_values: [r] s_i, descending; full: the pair's composition score, which is
    sqrt(sum s_i^2 scores_i^2 / sum s_i^2); shares: [r] each component's part of it.
    """

    channel: Channel
    singular_values: torch.Tensor
    scores: torch.Tensor

    @property
    def baseline(self) -> float:
        return self.channel.baseline

    @property
    def relative(self) -> torch.Tensor:
        return self.scores / self.baseline

    @property
    def full(self) -> float:
        s2 = self.singular_values.double().pow(2)
        return float((s2 * self.scores.double().pow(2)).sum().div(s2.sum()).sqrt())

    @property
    def shares(self) -> torch.Tensor:
        """[r] s_i^2 scores_i^2 / sum_j s_j^2 scores_j^2: how much of the composed norm^2 each carries."""
        w = self.singular_values.double().pow(2) * self.scores.double().pow(2)
        return (w / w.sum().clamp_min(1e-300)).float()


def channel_components(c: Circuits, composition: Composition, writer: Head, reader: Head,
                       mode: str) -> ChannelComponents:
    """Per-component scores of `writer`'s OV against `reader` in `mode`."""
    check_head(c, writer, "writer")
    check_head(c, reader, "reader")
    writer, reader = tuple(writer), tuple(reader)
    require_type(composition, Composition, "The composition scores")
    if mode not in composition.scores:
        raise ChannelsError(f"These composition scores hold modes {', '.join(composition.scores)}, not {mode!r}."[:200])
    if writer[0] >= reader[0]:
        raise ChannelsError(f"A writer must sit in an earlier layer than its reader; {head_label(writer)} does not "
                            f"come before {head_label(reader)}.")
    y = reader_factor(c, mode, reader[0])[reader[1]]  # [d, r]
    v = c.ov_V[writer]  # [d, r]
    scores = (v.transpose(0, 1) @ y).norm(dim=-1) / y.norm().clamp_min(1e-30)  # [r]
    channel = Channel(writer, reader, mode, float(composition.scores[mode][writer + reader]), composition.baseline)
    return ChannelComponents(channel, c.ov_S[writer], scores)


def check_head(c: Circuits, head: Head, what: str = "head") -> None:
    require_type(c, Circuits, "The circuits")
    if not isinstance(head, (tuple, list)) or len(head) != 2 or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in head):
        raise ChannelsError(f"The {what} is a (layer, head) pair of whole numbers, e.g. (1, 4), not {head!r}."[:200])
    layer, h = head
    if not (0 <= layer < c.n_layers and 0 <= h < c.n_heads):
        raise ChannelsError(f"The {what} {head_label(head)} is not in this model (layers 0..{c.n_layers - 1}, "
                            f"heads 0..{c.n_heads - 1}).")

