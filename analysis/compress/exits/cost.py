"""Cost model of early exits (METHODS.md §6), in FLOPs per token (LM) or per image.

A block costs its weight matmuls (2 FLOPs per weight: 24·d² for a GPT-2 block) plus
4·d·(mean keys) for attention; an exit check that reads out costs 2·d·V (+ 2·d² through a
tuned translator), on GPT-2 small about as much as five blocks, so checks are charged; a
saturation check costs a cosine (6·d) and the exit still needs one readout. A skipped layer
owes later tokens its keys and values: unless the savings are "oracle", its key and value
projections of the exit state (4·d·H·d_head) are charged too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from analysis.compress.exits.readouts import exit_depths
from lib.handle import ModelHandle


@dataclass(frozen=True)
class CostModel:
    """FLOPs per token (LM) or per image (classifier).

    layer: [n_layers] each layer's forward; readout: [K] one readout at each checked
    depth; state_check: [K] one saturation check (0 where it cannot fire); final: the
    model's own readout after its last layer (LM: 2·d·V; classifier: 0, its head is a
    layer); kv: [n_layers] what a skipped layer owes later tokens (its key and value
    projections; 0 for classifiers).
    """

    layer: tuple[float, ...]
    readout: tuple[float, ...]
    state_check: tuple[float, ...]
    final: float
    kv: tuple[float, ...]

    @property
    def full(self) -> float:
        return sum(self.layer) + self.final

    def exit_costs(self, depths: tuple[int, ...], criterion: str, oracle: bool) -> torch.Tensor:
        """Cost of a token that exits at checked depth index i = 0..K-1, and (index K)
        of one that never exits: [K + 1]."""
        reads = criterion != "saturation"
        check = torch.tensor(self.readout if reads else self.state_check, dtype=torch.float64)
        spent = check.cumsum(0)  # checks made up to and including index i
        ran = torch.tensor((0.0,) + self.layer, dtype=torch.float64).cumsum(0)  # [n_layers + 1]
        owed = torch.tensor(self.kv + (0.0,), dtype=torch.float64).flip(0).cumsum(0).flip(0)  # kv of layers >= l
        index = torch.tensor(depths)
        early = ran[index] + spent + (0.0 if reads else torch.tensor(self.readout, dtype=torch.float64))
        if not oracle:
            early = early + owed[index]
        never = self.full + float(check.sum())
        return torch.cat([early, torch.tensor([never], dtype=torch.float64)])


def lm_cost(handle: ModelHandle, seq_len: int, lens: str) -> CostModel:
    """Per-token FLOPs of a causal LM on windows of `seq_len` tokens: each block's weight
    matmuls (removed parts cost nothing) plus attention over (seq_len + 1) / 2 keys on average."""
    s = handle.structure
    L, width = s.n_layers, s.n_heads * s.d_head
    weights, attends = [0.0] * L, [False] * L
    for name, weight in handle.linear_layers().items():
        layer, sublayer = handle.place(name)
        if isinstance(layer, int):
            weights[layer] += 2.0 * weight.numel()
            attends[layer] = attends[layer] or sublayer == "attention"
    keys = (seq_len + 1) / 2
    layer = tuple(w + (4.0 * width * keys if a else 0.0) for w, a in zip(weights, attends))
    readout = 2.0 * s.d_model * s.d_vocab + (2.0 * s.d_model**2 if lens == "tuned" else 0.0)
    k = len(exit_depths(handle))
    kv = tuple(4.0 * s.d_model * width if a else 0.0 for a in attends)
    return CostModel(layer, (readout,) * k, (6.0 * s.d_model,) * k, 2.0 * s.d_model * s.d_vocab, kv)


def image_cost(handle: ModelHandle, states: list[torch.Tensor], output: torch.Tensor) -> CostModel:
    """Per-image FLOPs of a classifier from one pass's stage inputs: convolutions
    2·weights·output positions, linear layers 2·weights; an exit head pools its stage
    (C·H·W) and maps C channels to the classes."""
    names = [name for name, _ in handle.structure.stages]
    shapes = [tuple(s.shape[1:]) for s in states[1:]] + [tuple(output.shape[1:])]  # each stage's output
    layer = [0.0] * len(names)
    for name, weight in handle.linear_layers().items():
        stage = names.index(handle.place(name)[0])
        positions = math.prod(shapes[stage][1:]) if weight.dim() == 4 else 1
        layer[stage] += 2.0 * weight.numel() * positions
    classes = output.shape[-1]
    depths = exit_depths(handle)
    readout = tuple(float(states[k][0].numel() + 2 * states[k].shape[1] * classes) for k in depths)
    state_check = tuple(6.0 * states[k][0].numel() if states[k].shape == states[k - 1].shape else 0.0
                        for k in depths)
    return CostModel(tuple(layer), readout, state_check, 0.0, (0.0,) * len(names))
