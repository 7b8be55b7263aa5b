"""The exact linear map of a ReLU network on one input (LinearScope; METHODS.md §3).

With every ReLU mask and max-pool switch frozen at its state for an input x0, an image
model is exactly affine, F(x) = A(x0) x + b(x0). Row k of A is output k's weight on every
input pixel, column j what a unit impulse at pixel j adds to every output, b the frozen
network at input 0. All rows come from one forward and one vmapped backward
(`torch.func.jacrev`), never a pass per pixel or per class. Gradients run on a private
copy (`gradients.working_copy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.interpreter.gradients import InterpreterError, gradient_model
from lib.data import DIGIT_SHAPE, DataError, check_images
from lib.handle import ModelHandle

DEFAULT_SINGULAR = 8




@dataclass(frozen=True)
class LinearMap:
    """The exact affine map F(x) = A x + b of a piecewise-linear image model on the linear
    region of one input x0.

    x0: [C, H, W] the input; output: [K] F(x0) flattened (K classes, or output pixels);
    matrix: [K, N] A(x0), N = C·H·W; bias: [K] b(x0), the frozen network at input 0;
    output_shape: one output's shape ((10,) logits, (1, 8, 8) an image);
    error: max over outputs of |A x0 + b - F(x0)|; frozen: the layers frozen, as
    (path, type) pairs; singular_values: [k] the top singular values of A;
    input_vectors: [k, C, H, W] the matching right singular vectors (input patterns),
    output_vectors: [k, K] the left ones (what each pattern does to the outputs).
    """

    x0: torch.Tensor
    output: torch.Tensor
    matrix: torch.Tensor
    bias: torch.Tensor
    output_shape: tuple[int, ...]
    error: float
    frozen: tuple[tuple[str, str], ...]
    singular_values: torch.Tensor
    input_vectors: torch.Tensor
    output_vectors: torch.Tensor

    @property
    def n_outputs(self) -> int:
        return int(self.matrix.shape[0])

    def row(self, k: int) -> torch.Tensor:
        """Output k's weight on each input pixel, as an image [C, H, W]."""
        return self.matrix[k].view_as(self.x0)

    def column(self, j: int) -> torch.Tensor:
        """What a unit impulse at input pixel j (flat index) adds to every output, output-shaped."""
        return self.matrix[:, j].view(self.output_shape)

    def votes(self, k: int) -> torch.Tensor:
        """The vote map x0 ⊙ row_k [C, H, W]: each pixel's exact share of A x0 for output k."""
        return self.x0 * self.row(k)

    @property
    def input_part(self) -> torch.Tensor:
        """[K] A x0: what the input pixels contribute to each output."""
        return self.matrix @ self.x0.flatten()

    @property
    def bias_share(self) -> torch.Tensor:
        """[K] b_k / F_k(x0): how much of each output the bias alone accounts for."""
        return self.bias / self.output


def _image_input(x0: torch.Tensor) -> torch.Tensor:
    """One image as [1, C, H, W]; accepts [C, H, W] or [1, C, H, W]."""
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() not in (3, 4) \
            or (x0.dim() == 4 and x0.shape[0] != 1):
        what = f"shape {list(x0.shape)}, {x0.dtype}" if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise DataError(f"The linear interpreter takes one float image {list(DIGIT_SHAPE)}; got {what}.")
    x = x0 if x0.dim() == 4 else x0.unsqueeze(0)
    check_images(x)
    return x


def linear_map(handle: ModelHandle, x0: torch.Tensor, dtype: torch.dtype = torch.float64,
               n_singular: int = DEFAULT_SINGULAR) -> LinearMap:
    """A(x0), b(x0) and the reconstruction check for an image model at one image x0 [1, 8, 8].

    Runs on a private copy in `dtype` (or on `handle` itself if it already is a private
    copy). Raises CapabilityError naming a layer that is not piecewise linear.
    """
    if handle.kind == "causal-lm":
        raise InterpreterError("This is a language model; use token_contributions for a prompt.")
    if isinstance(n_singular, bool) or not isinstance(n_singular, int) or n_singular < 0:
        raise InterpreterError(f"The number of singular directions to keep is a whole number >= 0, "
                               f"not {n_singular!r}; pass 0 for none (the default is {DEFAULT_SINGULAR}).")
    x = _image_input(x0)
    model = gradient_model(handle, dtype)
    with model.gates.frozen_at(x) as output:
        x = x.to(output.dtype)

        def frozen(flat: torch.Tensor) -> torch.Tensor:  # [N] -> [K]
            return model.gates.differentiable_forward(flat.view_as(x)).flatten()

        matrix = torch.func.jacrev(frozen)(x.flatten())  # [K, N]: every row from one vmapped backward
        bias = model.gates.differentiable_forward(torch.zeros_like(x)).flatten().detach()  # [K]
    out = output.flatten()
    error = float((matrix @ x.flatten() + bias - out).abs().max())
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(n_singular, s.numel())
    u, vh = _sign_fixed(u[:, :k], vh[:k])
    return LinearMap(x[0], out, matrix, bias, tuple(output.shape[1:]), error, tuple(model.gates.nonlinearities()),
                     s[:k], vh.reshape(k, *x.shape[1:]), u.T.contiguous())


def _sign_fixed(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular vectors with a fixed sign (each input pattern sums to >= 0), so a gallery
    does not flip between runs: u [K, k], vh [k, N]."""
    signs = torch.where(vh.sum(1) < 0, -1.0, 1.0).to(vh.dtype)
    return u * signs, vh * signs[:, None]


def output_labels(linear: LinearMap) -> list[str]:
    """A name per output: "class 3" for a classifier, "pixel (r, c)" for an image output."""
    if len(linear.output_shape) == 1:
        return [f"class {k}" for k in range(linear.n_outputs)]
    h, w = linear.output_shape[-2:]
    return [f"pixel ({k // w % h}, {k % w})" for k in range(linear.n_outputs)]
