"""Edits that re-express weights instead of zeroing them (METHODS §4): low-rank
factorisation of linear layers, and layer sharing (relaxed recursive transformers).

    LowRank(rank=32, scope="mlp")        each MLP weight W [out, in] -> B A, rank 32
    LowRank(energy=0.9)                  the smallest rank keeping 90% of sum(s_i^2)
    ShareLayers(source=2, target=3, rank=8)   block 3 = block 2's weights + rank-8 deltas
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.compress.edits import Edit, applies, edit_type, is_int, require
from analysis.compress.prune.pruning import check_scope, scoped_layers
from lib.errors import RecipeError
from lib.handle import ModelHandle
from lib.layers import LowRankLinear, SharedLinear


def break_even_rank(out_features: int, in_features: int) -> float:
    """Below this rank a factorised layer has fewer parameters than the dense one:
    r (in + out) < in * out."""
    return out_features * in_features / (out_features + in_features)


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [rank, in], B [out, rank] with B A the best rank-`rank` approximation of weight
    [out, in] (Eckart-Young); the singular values are split evenly between the factors."""
    u, s, vh = torch.linalg.svd(weight.double().contiguous(), full_matrices=False)
    root = s[:rank].sqrt()
    a = (root[:, None] * vh[:rank]).to(weight.dtype)  # [rank, in]
    b = (u[:, :rank] * root[None, :]).to(weight.dtype)  # [out, rank]
    return a, b


def energy_rank(weight: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep `energy` of sum(s_i^2)."""
    s = torch.linalg.svdvals(weight.double().contiguous())
    kept = (s.pow(2).cumsum(0) / s.pow(2).sum()).tolist()
    return next(i + 1 for i, share in enumerate(kept) if share >= energy - 1e-12)


def spectrum(handle: ModelHandle, scope: str = "all", layers: tuple = ()) -> dict[str, torch.Tensor]:
    """Singular values (descending) of each scoped linear weight, for the spectrum view."""
    return {name: torch.linalg.svdvals(w.detach().double().reshape(w.shape[0], -1).contiguous()).float()
            for name, w in scoped_layers(handle, scope, layers).items() if w.dim() == 2}


@edit_type("low_rank")
@dataclass(frozen=True)
class LowRank(Edit):
    """Replace each scoped linear weight by its truncated SVD as two real linear maps:
    a fixed `rank`, or per layer the smallest rank keeping `energy` of the spectrum."""

    rank: int | None = None
    energy: float | None = None
    scope: str = "all"
    layers: tuple = ()

    def __post_init__(self) -> None:
        require((self.rank is None) != (self.energy is None), "A low-rank edit gives either a rank or an energy.")
        if self.rank is not None:
            require(is_int(self.rank) and self.rank > 0, f"A rank is a whole number > 0, not {self.rank!r}.")
        else:
            require(isinstance(self.energy, (int, float)) and not isinstance(self.energy, bool)
                    and 0 < self.energy <= 1, f"The kept energy is a fraction in (0, 1], not {self.energy!r}.")
        check_scope(self)

    @property
    def label(self) -> str:
        what = f"rank {self.rank}" if self.rank is not None else f"{self.energy:.0%} energy"
        return f"low rank ({what}, {self.scope})"

    def ranks(self, handle: ModelHandle) -> dict[str, int]:
        """The rank each scoped layer gets."""
        out = {}
        for name, w in scoped_layers(handle, self.scope, self.layers).items():
            if w.dim() != 2:
                continue  # convolutions are left alone
            full = min(w.shape)
            if self.rank is not None and self.rank > full:
                raise RecipeError(f"Rank {self.rank} is above the full rank {full} of {name} {tuple(w.shape)}.")
            out[name] = self.rank if self.rank is not None else energy_rank(w, self.energy)
        if not out:
            raise RecipeError("No fully connected layer in this scope can be factorised.")
        return out


@applies(LowRank)
@torch.no_grad()
def _low_rank(handle: ModelHandle, edit: LowRank) -> None:
    for name, rank in edit.ranks(handle).items():
        weight, bias, transposed = handle.linear_parameter(name)
        a, b = truncated_svd(weight.T if transposed else weight, rank)
        handle.replace_linear_(name, LowRankLinear(a, b, bias, transposed))


@edit_type("share_layers")
@dataclass(frozen=True)
class ShareLayers(Edit):
    """Block `target` reuses block `source`'s linear weights plus, per layer, the rank-`rank`
    SVD of the difference W_target - W_source (rank 0: pure sharing). Its own biases and
    LayerNorms stay."""

    source: int
    target: int
    rank: int = 0

    def __post_init__(self) -> None:
        require(is_int(self.source) and is_int(self.target) and self.source >= 0 and self.target >= 0,
                "Layer sharing names two block indices >= 0.")
        require(self.source != self.target, f"A block cannot share its weights with itself (block {self.source}).")
        require(is_int(self.rank) and self.rank >= 0, f"The delta rank is a whole number >= 0, not {self.rank!r}.")

    @property
    def label(self) -> str:
        return f"block {self.target} shares block {self.source}'s weights (delta rank {self.rank})"

    def pairs(self, handle: ModelHandle) -> dict[str, str]:
        """Target layer name -> source layer name, for the linear layers both blocks have."""
        layers = handle.linear_layers()
        by_role = {}
        for name in layers:
            block, _ = handle.place(name)
            if block in (self.source, self.target):
                by_role.setdefault(name.split(".", 2)[-1], {})[block] = name
        pairs = {roles[self.target]: roles[self.source] for roles in by_role.values()
                 if self.source in roles and self.target in roles}
        if not pairs:
            raise RecipeError(f"Blocks {self.source} and {self.target} have no linear layers in common to share.")
        for target, source in pairs.items():
            if layers[target].shape != layers[source].shape:
                raise RecipeError(f"{target} {tuple(layers[target].shape)} and {source} "
                                  f"{tuple(layers[source].shape)} differ in shape; they cannot share a weight.")
            if self.rank > min(layers[target].shape):
                raise RecipeError(f"Rank {self.rank} is above the full rank {min(layers[target].shape)} of {target}.")
        return pairs


@applies(ShareLayers)
@torch.no_grad()
def _share(handle: ModelHandle, edit: ShareLayers) -> None:
    for target, source in edit.pairs(handle).items():
        shared, _, shared_transposed = handle.linear_parameter(source)
        weight, bias, transposed = handle.linear_parameter(target)
        own = weight.T if transposed else weight  # [out, in]
        base = shared.T if shared_transposed else shared
        a = b = None
        if edit.rank > 0:
            a, b = truncated_svd(own - base, edit.rank)
        handle.replace_linear_(target, SharedLinear(shared, a, b, bias, transposed, shared_transposed))
