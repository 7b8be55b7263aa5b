"""Weights across depth: how far each block's weights are a linear function of depth
("Transformer as Linear Expansion of Learngene": a trained transformer's layer l is close
to θ_A + (l/L)·θ_B, a shared module expanded linearly in depth), how alike consecutive
layers are, and what the lab's shared-blocks edit (`ShareLayers`) would lose per pair.

A weight family is one role in every block (`attn.q`, `attn.o`, `mlp.in`). A fused
query/key/value projection (`attn.qkv`: GPT-2's Conv1D c_attn, GPT-NeoX's query_key_value)
is split into its Q, K and V rows where the handle knows the layout (`handle.heads.qkv_layout`), and stays
one "QKV (fused)" family where it does not. For a family with layers
W_l [out, in] at depths t_l = l/L, least squares gives θ_A, θ_B per weight, and

    relative residual_l = ‖W_l − θ_A − t_l·θ_B‖_F / ‖W_l‖_F.

Layers that share nothing leave, in expectation, sqrt(1 − h_l) of their norm (h_l the
leverage of depth t_l in a straight-line fit over the depths present: 2/n on average), so
that is the chance level every residual is shown against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.compress.prune.factorize import ShareLayers
from lib.errors import CapabilityError
from lib.handle import ModelHandle, check_handle
from lib.progress import Progress

QKV_ROLES = ("attn.q", "attn.k", "attn.v")
FAMILY_NAMES = {"attn.q": "Q", "attn.k": "K", "attn.v": "V", "attn.qkv": "QKV (fused)", "attn.o": "O",
                "mlp.in": "MLP in", "mlp.gate": "MLP gate", "mlp.out": "MLP out"}


@dataclass(frozen=True)
class DepthFit:
    """The depth-linearity fit and consecutive-layer comparisons of every weight family.

    families: F roles (`attn.q`, `attn.o`, `mlp.in`, ...); labels: their names as shown ("Q", "O",
    "MLP in"); qkv_layout: how Q, K, V were split from a fused weight (None: not split).
    layers: n block indices present (a family's layers all have one shape); n_layers: L.
    residual: [F, n] relative residual of each layer under θ_A + (l/L)·θ_B;
    chance: [n] sqrt(1 − h_l), the residual unrelated layers would leave in expectation.
    cosine: [F, n-1] cosine between layer i's and layer i+1's weights (flattened).
    share_loss: [F, n-1] relative change of layer i+1's weights if it shared layer i's
    (`ShareLayers(source=i, target=i+1, rank=share_rank)`): ‖W_{i+1} − W_i − SVD_r(W_{i+1} − W_i)‖ /
    ‖W_{i+1}‖ (for split Q, K, V: their rows of the fused weight's change, as the edit shares the
    fused weight whole); share_total: [n-1] the same over all families of the pair together;
    share_params: [n-1] weights the pair's sharing would save (minus the deltas' factors).
    """

    families: tuple[str, ...]
    labels: tuple[str, ...]
    layers: tuple[int, ...]
    n_layers: int
    residual: torch.Tensor
    chance: torch.Tensor
    cosine: torch.Tensor
    share_loss: torch.Tensor
    share_total: torch.Tensor
    share_params: torch.Tensor
    share_rank: int
    qkv_layout: str | None = None  # how a fused Q/K/V weight was split: "blocks", "per-head" (None: not split)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.layers, self.layers[1:]))


def weight_families(handle: ModelHandle) -> tuple[tuple[int, ...], dict[str, dict[int, torch.Tensor]]]:
    """Block indices and role -> {block: weight [out, in]} for the roles that every present
    block has in one shape (what can be fitted across depth and shared)."""
    check_handle(handle)
    by_role: dict[str, dict[int, torch.Tensor]] = {}
    for name, weight in handle.linear_layers().items():
        block, _ = handle.place(name)
        if isinstance(block, int) and weight.dim() == 2:
            by_role.setdefault(name.split(".", 2)[-1], {})[block] = weight
    blocks = sorted({b for layers in by_role.values() for b in layers})
    families = {role: layers for role, layers in by_role.items()
                if sorted(layers) == blocks and len({tuple(w.shape) for w in layers.values()}) == 1}
    if len(blocks) < 3 or not families:
        what = ("an image model's stages differ in shape" if handle.kind != "causal-lm"
                else f"this model has {len(blocks)} block(s) with weights of one shape")
        raise CapabilityError(f"Weights across depth compare blocks of one shape, at least 3 of them: {what}.")
    return tuple(blocks), families


def split_qkv(weight: torch.Tensor, layout: str, d_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Q, K and V rows [heads · d_head, in] each of a fused weight [3 · heads · d_head, in]
    (a bias as [3 · heads · d_head, 1]): "blocks" stacks all of Q, then K, then V; "per-head"
    stacks [q; k; v] of head 0, then of head 1, ... (views, no copy)."""
    if layout == "blocks":
        q, k, v = weight.chunk(3, dim=0)
        return q, k, v
    if layout == "per-head":
        heads = weight.reshape(-1, 3, d_head, weight.shape[1])  # [heads, q k v, d_head, in]
        q, k, v = (heads[:, j].reshape(-1, weight.shape[1]) for j in range(3))
        return q, k, v
    raise CapabilityError(f"Unknown layout {layout!r} of a fused query/key/value weight (blocks or per-head).")


def split_families(handle: ModelHandle, families: dict[str, dict[int, torch.Tensor]]
                   ) -> tuple[dict[str, dict[int, torch.Tensor]], str | None]:
    """`families` with a fused `attn.qkv` replaced, in place in the order, by `attn.q`,
    `attn.k`, `attn.v` when every block's layout is known and the same; and that layout."""
    fused = families.get("attn.qkv")
    layouts = {handle.heads.qkv_layout(b) for b in fused} if fused else {None}
    if len(layouts) != 1 or None in layouts:
        return families, None
    layout = layouts.pop()
    out: dict[str, dict[int, torch.Tensor]] = {}
    for role, layers in families.items():
        if role != "attn.qkv":
            out[role] = layers
            continue
        parts = {b: split_qkv(w, layout, handle.structure.d_head) for b, w in layers.items()}
        out.update({r: {b: p[j] for b, p in parts.items()} for j, r in enumerate(QKV_ROLES)})
    return out, layout


def linear_fit(weights: torch.Tensor, depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares θ_A, θ_B [...] with weights[l] ≈ θ_A + depths[l]·θ_B, from weights
    [n, ...] at depths [n]; and the relative residual of each layer [n]."""
    w = weights.double().reshape(len(depths), -1)  # [n, m]
    t = depths.double().to(w.device)
    centred = t - t.mean()
    theta_b = centred @ (w - w.mean(0)) / (centred @ centred)  # [m]
    theta_a = w.mean(0) - t.mean() * theta_b
    fitted = theta_a[None, :] + t[:, None] * theta_b[None, :]
    residual = (w - fitted).norm(dim=1) / w.norm(dim=1).clamp_min(1e-30)
    shape = weights.shape[1:]
    return theta_a.reshape(shape), theta_b.reshape(shape), residual


def chance_residual(depths: torch.Tensor) -> torch.Tensor:
    """[n] sqrt(1 − h_l): the expected relative residual of layers that share nothing
    (independent, zero-mean, equal norms), h_l = 1/n + (t_l − t̄)² / Σ(t − t̄)²."""
    t = depths.double()
    centred = t - t.mean()
    leverage = 1 / len(t) + centred**2 / (centred @ centred)
    return (1 - leverage).clamp_min(0).sqrt()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def _share_residual(source: torch.Tensor, target: torch.Tensor, rank: int) -> torch.Tensor:
    """target − source − its best rank-`rank` part [out, in]: what `ShareLayers` changes.
    The rank-`rank` part is the delta projected on its top singular vectors on its shorter
    side, the eigenvectors of that side's Gram matrix (float64): the residual of a full SVD
    (`truncated_svd`, which the edit takes) to about 1e-14, at a fraction of its cost
    (0.15 s instead of 0.71 s for a 768 x 3072 delta on two cores)."""
    delta = (target - source).double()
    if rank > 0:
        wide = delta.shape[0] <= delta.shape[1]
        gram = delta @ delta.T if wide else delta.T @ delta
        top = torch.linalg.eigh(gram).eigenvectors[:, -rank:]  # eigenvalues ascend: the largest are last
        delta = delta - top @ (top.T @ delta) if wide else delta - (delta @ top) @ top.T
    return delta


@torch.no_grad()
def depth_fit(handle: ModelHandle, share_rank: int = 0, progress: Progress | None = None) -> DepthFit:
    """The depth-linearity fit, consecutive cosines and shared-blocks losses of every weight
    family of `handle` (weights only, no forward). `progress`: after each family's fit and
    each pair of consecutive blocks."""
    blocks, stored = weight_families(handle)
    families, layout = split_families(handle, stored)
    n_layers = handle.structure.n_layers
    roles = tuple(families)
    depths = torch.tensor(blocks, dtype=torch.float64) / n_layers
    steps = len(roles) + len(blocks) - 1
    step = progress or (lambda f, m: None)
    residual = []
    for k, r in enumerate(roles):
        residual.append(linear_fit(torch.stack([families[r][b] for b in blocks]), depths)[2])
        step((k + 1) / steps, f"the line through {FAMILY_NAMES.get(r, r)}")
    residual = torch.stack(residual).cpu()
    cosine = torch.tensor([[_cosine(families[r][a], families[r][b]) for a, b in zip(blocks, blocks[1:])]
                           for r in roles])
    loss = torch.zeros(len(roles), len(blocks) - 1, dtype=torch.float64)
    total = torch.zeros(len(blocks) - 1, dtype=torch.float64)
    saved = torch.zeros(len(blocks) - 1, dtype=torch.long)
    for i, (a, b) in enumerate(zip(blocks, blocks[1:])):
        pairs = ShareLayers(source=a, target=b, rank=share_rank).pairs(handle)  # the edit's own pairing and checks
        error = norm = 0.0
        for target in pairs:
            role = target.split(".", 2)[-1]
            if role not in stored:
                continue
            w_t = stored[role][b]
            change = _share_residual(stored[role][a], w_t, share_rank)  # the edit shares the stored (fused) weight
            split = role == "attn.qkv" and layout is not None
            for part, part_t, part_role in (zip(split_qkv(change, layout, handle.structure.d_head),
                                                split_qkv(w_t, layout, handle.structure.d_head), QKV_ROLES)
                                            if split else [(change, w_t, role)]):
                loss[roles.index(part_role), i] = (float(part.pow(2).sum())
                                                   / max(float(part_t.double().pow(2).sum()), 1e-30)) ** 0.5
            error, norm = error + float(change.pow(2).sum()), norm + float(w_t.double().pow(2).sum())
            saved[i] += w_t.numel() - share_rank * sum(w_t.shape)
        total[i] = (error / max(norm, 1e-30)) ** 0.5
        step((len(roles) + i + 1) / steps, f"block {b} sharing block {a}'s weights")
    return DepthFit(roles, tuple(FAMILY_NAMES.get(r, r) for r in roles), blocks, n_layers, residual.float(),
                    chance_residual(depths).float(), cosine.float(), loss.float(), total.float(), saved, share_rank,
                    layout)
