"""Calibrated quantization (METHODS §5): QuantEase cyclic coordinate descent on a layer's
calibration inputs, and the relative layer-output error it is judged by, next to
round-to-nearest (RTN) on the same grid.

With calibration inputs X [positions, in] of a layer and Sigma = X^T X [in, in], QuantEase
minimises ||W X^T - Ŵ X^T||_F^2 over Ŵ on the format's grid one input column at a time:

    Ŵ[:, j] = q( ((W Σ)[:, j] - sum_{k != j} Ŵ[:, k] Σ[k, j]) / Σ[j, j] )

Each update is the exact minimiser over the grid for that column (the objective separates
per row into Σ[j, j] (ŵ_ij - u_ij)^2 + const), so after the first sweep the error never
rises. Only matrix-vector work: no inversion, unlike GPTQ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from analysis.compress.edits import calibration_forward
from analysis.compress.quant.formats import Grid, fit_grid, get_format
from lib.errors import RecipeError
from lib.handle import ModelHandle

SWEEPS = 25
_GRAM_BUDGET = 2**28  # bytes of Σ matrices gathered per calibration forward


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight [out, in, ...] as the matrix [out, in * kh * kw] it applies (float32 copy)."""
    return weight.detach().reshape(weight.shape[0], -1).float()


def layer_error(w: torch.Tensor, w_hat: torch.Tensor, sigma: torch.Tensor) -> float:
    """Relative layer-output error ||(W - Ŵ) X^T|| / ||W X^T|| from Σ = X^T X: W, Ŵ [out, in],
    Σ [in, in]. ||A X^T||_F^2 = trace(A Σ A^T)."""
    w, d, s = w.double(), (w - w_hat).double(), sigma.double()
    num = ((d @ s) * d).sum().clamp_min(0)
    den = ((w @ s) * w).sum()
    return math.sqrt(float(num / den)) if den > 0 else 0.0


@torch.no_grad()
def quantease(w: torch.Tensor, sigma: torch.Tensor, grid: Grid, sweeps: int = SWEEPS, tol: float = 1e-3,
              block: int | None = None) -> torch.Tensor:
    """QuantEase: Ŵ [out, in] on `grid` minimising the layer-output error on calibration
    inputs with Σ [in, in]. Columns are visited in order of diag(Σ) descending, for at most
    `sweeps` sweeps (fewer once a sweep lowers the squared error by under `tol` of
    itself); a column no input reaches (Σ[j, j] = 0) keeps its round-to-nearest value.

    The first sweep starts from Ŵ = W, so each column compensates the rounding of the
    columns before it (as GPTQ does); later sweeps only lower the error. R = (W - Ŵ) Σ is
    kept up to date in blocks of `block` columns: rank-1 updates inside a block, one matrix
    product per block for the rest. The default block keeps a rank-1 update under torch's
    parallel grain (32768 elements): on a busy machine threaded small updates crawl."""
    w_t = w.float().T.contiguous()  # [in, out]: column j of W is row j, contiguous
    s = sigma.float()
    block = block or max(8, min(128, 32768 // w_t.shape[1]))
    diag = torch.diagonal(s).clone()
    order = torch.argsort(diag, descending=True)
    live = order[diag[order] > 0]
    round_column = grid.column_rounder()
    inverse = (1 / diag.clamp_min(1e-30)).tolist()  # plain floats: no tensor indexing per column
    hat_t = grid.quantize(w.float()).T.contiguous()  # RTN for every column; live columns are then redone
    hat_t[live] = w_t[live]
    r_t = s @ (w_t - hat_t)  # [in, out] = ((W - Ŵ) Σ)^T
    error = None
    for _ in range(sweeps):
        for b0 in range(0, len(live), block):
            cols = live[b0:b0 + block]
            s_blk = s[cols]  # [k, in]
            s_inner = s_blk[:, cols]  # [k, k]
            r_blk = r_t[cols]  # [k, out] (a copy), kept current inside the block
            before_blk = hat_t[cols]  # [k, out] (a copy)
            for i, j in enumerate(cols.tolist()):
                old = hat_t[j]
                new = round_column(torch.add(old, r_blk[i], alpha=inverse[j]), j)  # q(unconstrained minimiser)
                r_blk.addr_(s_inner[i], new - old, alpha=-1)  # BLAS rank-1 update
                old.copy_(new)
            r_t -= s_blk.T @ (hat_t[cols] - before_blk)  # the block's own rows get what r_blk already has
        before, error = error, float(((w_t - hat_t) * r_t).sum())  # ||(W - Ŵ) X||^2
        if before is not None and before - error <= tol * before:
            break
    return hat_t.T.contiguous()


def calibration_grams(handle: ModelHandle, inputs: torch.Tensor | None, names: Sequence[str],
                      share: float = 1.0) -> dict[str, torch.Tensor]:
    """Σ = X^T X [in, in] for each linear layer of `names`, from `inputs` [batch, ...] (None:
    the model's evaluation batch), as the model is now (earlier edits included). Layers are gathered a few at
    a time so the Σ matrices of one forward stay under ~256 MiB (`gram_chunks`); the forwards
    move the first `share` of the bar of the edit being applied (`calibration_forward`)."""
    from lib.data import default_batch
    from lib.metrics import model_inputs

    inputs = model_inputs(default_batch(handle)) if inputs is None else inputs
    chunks = gram_chunks(handle, names)
    grams: dict[str, torch.Tensor] = {}
    for k, chunk in enumerate(chunks):
        with calibration_forward(handle, k, len(chunks), share):
            grams.update(handle.input_grams(inputs, chunk))
    return grams


def gram_chunks(handle: ModelHandle, names: Sequence[str]) -> list[list[str]]:
    """The layers of `names` in the groups one calibration forward gathers (their Σ
    matrices under ~256 MiB together)."""
    widths = {n: w[0].numel() for n, w in handle.linear_layers().items() if n in set(names)}  # no float copy
    chunks, chunk = [], []
    for name in names:
        chunk.append(name)
        if sum(widths[n] ** 2 * 4 for n in chunk) >= _GRAM_BUDGET or name == names[-1]:
            chunks.append(chunk)
            chunk = []
    return chunks


def quantease_work(handle: ModelHandle, names: Sequence[str], positions: int) -> tuple[float, list[float]]:
    """QuantEase's cost on the layers `names`, in forwards of `positions` positions (a forward:
    2 x the linear weights' multiply-adds per position): its calibration forwards, then each
    layer's SWEEPS sweeps of 2 in^2 out multiply-adds. Only a guide to a bar's shares: on the
    GPT-2-small shape (16 x 256 tokens, int4) applying it took 15.1 forwards' time against
    8.9 counted so (its column updates are many small operations), and a bar shared by these
    counts rose in step with the time."""
    weights = handle.linear_layers()
    forward = 2 * sum(w.numel() for w in weights.values()) * max(positions, 1)
    solves = [SWEEPS * 2 * weights[n][0].numel() ** 2 * weights[n].shape[0] / forward for n in names]
    return float(len(gram_chunks(handle, names))), solves


@dataclass(frozen=True)
class MethodComparison:
    """Relative layer-output error per layer of round-to-nearest and QuantEase on the same
    grid. layers: linear layer names; rtn, quantease: [n_layers] errors ||(W - Ŵ)X|| / ||WX||."""

    format: str
    group_size: int | None
    layers: tuple[str, ...]
    rtn: tuple[float, ...]
    quantease: tuple[float, ...]

    @property
    def mean_rtn(self) -> float:
        return sum(self.rtn) / len(self.rtn)

    @property
    def mean_quantease(self) -> float:
        return sum(self.quantease) / len(self.quantease)


def compare_methods(handle: ModelHandle, inputs: torch.Tensor | None, fmt: str, names: Sequence[str],
                    group_size: int | None = None, sweeps: int = SWEEPS) -> MethodComparison:
    """RTN and QuantEase errors for the linear layers `names`, calibrated on `inputs` (None:
    the evaluation batch); the model is not changed."""
    format_ = get_format(fmt)
    weights = handle.linear_layers()
    unknown = [name for name in names if name not in weights]
    if unknown:
        raise RecipeError(f"The model has no linear layer {unknown[0]!r}; its layers are "
                          f"{', '.join(list(weights)[:6])}, ... Pick layers from handle.linear_layers().")
    grams = calibration_grams(handle, inputs, names)
    rtn, qe = [], []
    for name in names:
        w = as_matrix(weights[name])
        grid = fit_grid(w, format_, group_size)
        rtn.append(layer_error(w, grid.quantize(w), grams[name]))
        qe.append(layer_error(w, quantease(w, grams[name], grid, sweeps), grams[name]))
    return MethodComparison(fmt, group_size, tuple(names), tuple(rtn), tuple(qe))
