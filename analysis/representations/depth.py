"""Weights across depth: how far each block's weights are a linear function of depth
("Transformer as Linear Expansion of Learngene": a trained transformer's layer l is close
to θ_A + (l/L)·θ_B, a shared module expanded linearly in depth), how alike consecutive
layers are, and what the lab's shared-blocks edit (`ShareLayers`) would lose per pair.

A weight family is one role in every block, as the model stores it (`attn.q`, `attn.o`,
`mlp.in`; GPT-2 keeps Q, K and V in one fused `attn.qkv`). For a family with layers
W_l [out, in] at depths t_l = l/L, least squares gives θ_A, θ_B per weight, and

    relative residual_l = ‖W_l − θ_A − t_l·θ_B‖_F / ‖W_l‖_F.

Layers that share nothing leave, in expectation, sqrt(1 − h_l) of their norm (h_l the
leverage of depth t_l in a straight-line fit over the depths present: 2/n on average), so
that is the chance level every residual is shown against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.compress.prune.factorize import ShareLayers, truncated_svd
from lib.errors import CapabilityError
from lib.handle import ModelHandle, check_handle

FAMILY_NAMES = {"attn.q": "Q", "attn.k": "K", "attn.v": "V", "attn.qkv": "QKV (fused)", "attn.o": "O",
                "mlp.in": "MLP in", "mlp.gate": "MLP gate", "mlp.out": "MLP out"}


@dataclass(frozen=True)
class DepthFit:
    """The depth-linearity fit and consecutive-layer comparisons of every weight family.

    families: F roles (`attn.o`, `mlp.in`, ...); labels: their names as shown ("O", "MLP in").
    layers: n block indices present (a family's layers all have one shape); n_layers: L.
    residual: [F, n] relative residual of each layer under θ_A + (l/L)·θ_B;
    chance: [n] sqrt(1 − h_l), the residual unrelated layers would leave in expectation.
    cosine: [F, n-1] cosine between layer i's and layer i+1's weights (flattened).
    share_loss: [F, n-1] relative change of layer i+1's weights if it shared layer i's
    (`ShareLayers(source=i, target=i+1, rank=share_rank)`): ‖W_{i+1} − W_i − SVD_r(W_{i+1} − W_i)‖ /
    ‖W_{i+1}‖; share_total: [n-1] the same over all families of the pair together;
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


def _share_error(source: torch.Tensor, target: torch.Tensor, rank: int) -> float:
    """‖target − source − SVD_rank(target − source)‖², the squared error `ShareLayers` leaves."""
    delta = (target - source).double()
    if rank > 0:
        a, b = truncated_svd(delta, rank)  # delta ≈ b @ a
        delta = delta - b @ a
    return float(delta.pow(2).sum())


@torch.no_grad()
def depth_fit(handle: ModelHandle, share_rank: int = 0) -> DepthFit:
    """The depth-linearity fit, consecutive cosines and shared-blocks losses of every weight
    family of `handle` (weights only, no forward)."""
    blocks, families = weight_families(handle)
    n_layers = handle.structure.n_layers
    roles = tuple(families)
    depths = torch.tensor(blocks, dtype=torch.float64) / n_layers
    residual = torch.stack([linear_fit(torch.stack([families[r][b] for b in blocks]), depths)[2].cpu() for r in roles])
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
            if role not in families:
                continue
            w_t, w_s = families[role][b], families[role][a]
            squared = _share_error(w_s, w_t, share_rank)
            loss[roles.index(role), i] = (squared / max(float(w_t.double().pow(2).sum()), 1e-30)) ** 0.5
            error, norm = error + squared, norm + float(w_t.double().pow(2).sum())
            saved[i] += w_t.numel() - share_rank * sum(w_t.shape)
        total[i] = (error / max(norm, 1e-30)) ** 0.5
    return DepthFit(roles, tuple(FAMILY_NAMES.get(r, r) for r in roles), blocks, n_layers, residual.float(),
                    chance_residual(depths).float(), cosine.float(), loss.float(), total.float(), saved, share_rank)
