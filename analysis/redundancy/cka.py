"""Linear CKA between representations of the same samples (METHODS.md §1).

For column-centred X [N, d_x] and Y [N, d_y] (N samples: tokens or images),

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)      (feature form, d x d products)
              = <K_X, K_Y> / (||K_X||_F ||K_Y||_F)              (Gram form, K = X X^T [N, N]).

Both are exact; `cka_matrix` picks the one with fewer flops for the sizes at hand and
falls back to the minibatch unbiased estimator (Nguyen et al. 2021) beyond
`CKA_EXACT_MAX_TOKENS` samples. Either exact form computes the D x D matrix of inner
products <K_i, K_j> and normalises it, so the diagonal is computed, not filled in.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from lib.errors import AnalysisError

CKA_EXACT_MAX_TOKENS = 4096  # beyond this, the minibatch unbiased estimator
CKA_MINIBATCH = 512
GRAM_BLOCK_ROWS = 128  # rows of every K_i per step: memory D * 128 * N floats, not D * N^2
GRAM_BLOCK_ELEMENTS = 1 << 24  # and never more than this many floats per step
INNER_CHUNK = 1024  # elements per float32 partial inner product (then summed in float64)

CkaForm = Literal["gram", "feature"]


def check_representations(reps: Sequence[torch.Tensor]) -> tuple[int, list[int]]:
    """Raise `AnalysisError` unless `reps` are finite matrices [N, d_i] of the same N >= 2
    samples with d_i >= 1; returns N and the widths d_i."""
    if len(reps) == 0:
        raise AnalysisError("CKA needs at least one representation to compare.")
    for i, r in enumerate(reps):
        if r.dim() != 2:
            raise AnalysisError(
                f"CKA compares matrices [samples, features], but representation {i} has shape "
                f"{tuple(r.shape)}. Flatten each sample's activations into one row first.")
    counts = [int(r.shape[0]) for r in reps]
    if len(set(counts)) > 1:
        shown = ", ".join(map(str, counts[:8])) + (" …" if len(counts) > 8 else "")
        raise AnalysisError(
            f"CKA compares representations of the same samples, but the sample counts differ "
            f"({shown}). Record every representation from the same batch.")
    if counts[0] < 2:
        raise AnalysisError(
            f"CKA needs at least two samples (tokens or images) to centre over; got {counts[0]}. "
            "Use a batch with more images or longer text.")
    widths = [int(r.shape[1]) for r in reps]
    if min(widths) < 1:
        raise AnalysisError(f"Representation {widths.index(min(widths))} has no features; CKA is undefined.")
    for i, r in enumerate(reps):
        if r.is_floating_point() and not bool(torch.isfinite(r).all()):
            raise AnalysisError(
                f"Representation {i} holds NaN or infinite values, so its CKA with every other one would be "
                "NaN. The model produced them on this batch (an edit or bad weights can cause this); "
                "check the model's outputs on this batch first.")
    return counts[0], widths


def form_flops(n_samples: int, widths: Sequence[int]) -> dict[str, float]:
    """Flops of each exact form for D = len(widths) representations of N samples,
    multiply-adds counted as two flops, as this module computes them.

    feature: Y^T X for every pair i <= j (self pairs give ||X^T X||): 2 N sum_{i<=j} d_i d_j,
      about D^2/2 * 2 N d^2 for equal widths.
    gram: the upper triangle of every K_i = X_i X_i^T (K is symmetric) in row blocks of
      `GRAM_BLOCK_ROWS`, about sum_i N (N + b) d_i, plus the inner products of the
      flattened triangles, about D^2 N^2. (METHODS' D * 2 N^2 d counts the full K.)
    """
    n, b = n_samples, min(GRAM_BLOCK_ROWS, n_samples)
    total, squares = sum(widths), sum(w * w for w in widths)
    feature = n * (total**2 + squares)
    gram = n * (n + b) * total + len(widths) ** 2 * n * (n + b)
    return {"feature": float(feature), "gram": float(gram)}


def cheaper_form(n_samples: int, widths: Sequence[int]) -> CkaForm:
    """The exact form with fewer flops (`form_flops`): Gram for few samples relative to
    the widths (N below about d * D), feature otherwise."""
    flops = form_flops(n_samples, widths)
    return "gram" if flops["gram"] < flops["feature"] else "feature"


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of x [N, d1] and y [N, d2] in the d x d form, in float64:
    ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) with column-centred X, Y."""
    check_representations([x, y])
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).pow(2).sum()
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


def cka_matrix(reps: Sequence[torch.Tensor], minibatch: int = CKA_MINIBATCH,
               exact_max: int = CKA_EXACT_MAX_TOKENS, form: CkaForm | None = None) -> torch.Tensor:
    """Linear CKA between every pair of representations, each [N, d_i]: [D, D] float64.

    Exact up to `exact_max` samples, by `form` or else the cheaper form (`cheaper_form`);
    beyond, the minibatch estimator (`minibatch` samples per step) unless a form is
    given. float32 inputs are computed with float32 products (partial sums accumulated in
    float64), within 1e-6 of a float64 computation; float64 inputs in float64.
    An entry is NaN where a representation is constant over the samples (CKA undefined).
    """
    n, widths = check_representations(reps)
    if form not in (None, "gram", "feature"):
        raise AnalysisError(f"Unknown CKA form {form!r}; use 'gram', 'feature' or None (the cheaper one).")
    if form is None and n > exact_max:
        return _cka_minibatch(reps, minibatch)
    dtype = torch.float64 if any(r.dtype == torch.float64 for r in reps) else torch.float32
    centred = _centred(reps, widths, dtype)  # [N, sum d_i]
    views = list(centred.split(widths, dim=1))  # [N, d_i] each
    inner = _gram_inner(views) if (form or cheaper_form(n, widths)) == "gram" else _feature_inner(centred, widths)
    norms = inner.diagonal().sqrt()  # ||K_i||_F = ||X_i^T X_i||_F
    return inner / (norms[:, None] * norms[None, :])


def _centred(reps: Sequence[torch.Tensor], widths: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The column-centred representations side by side: [N, sum d_i].

    Centred twice: subtracting a float32 mean leaves each column off by up to
    eps * |mean|, large next to the spread of residual-stream features whose mean is far
    from zero; the second pass removes that offset (as accurate as centring in float64,
    at a tenth of the cost).
    """
    centred = torch.empty(reps[0].shape[0], sum(widths), dtype=dtype)
    for r, view in zip(reps, centred.split(widths, dim=1)):
        x = r.detach().to(dtype)  # no copy when it already is
        torch.sub(x, x.mean(0), out=view)
        view.sub_(view.mean(0))
    return centred


def _feature_inner(centred: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """<K_i, K_j> = ||X_j^T X_i||_F^2 for all pairs, from centred [N, sum d_i]: [D, D] float64.

    One product per i against every j >= i at once (X_i^T [X_i, ..., X_D], [d_i, sum d_j]);
    squared entries are summed per column in float64 and then per representation.
    """
    D = len(widths)
    owner = torch.repeat_interleave(torch.arange(D), torch.tensor(widths))  # column -> representation
    inner = torch.zeros(D, D, dtype=torch.float64)
    start = 0
    for i, width in enumerate(widths):
        cross = centred[:, start:start + width].T @ centred[:, start:]  # [d_i, sum_{j>=i} d_j]
        per_column = cross.square().sum(0, dtype=torch.float64)
        inner[i, i:] = torch.zeros(D, dtype=torch.float64).index_add_(0, owner[start:], per_column)[i:]
        start += width
    return torch.triu(inner) + torch.triu(inner, 1).T


def _gram_inner(views: list[torch.Tensor]) -> torch.Tensor:
    """<K_i, K_j> = sum_ab K_i[a, b] K_j[a, b] for all pairs: [D, D] float64.

    K is symmetric, so only its upper triangle is built, one block of b rows at a time:
    the diagonal block K[r, r] [b, b] counts once, the block right of it K[r, r_end:]
    twice. Each block's D Gram pieces are stacked flattened ([D, b * N]) so one matmul
    gives all D^2 inner products; memory stays D * b * N floats.
    """
    D, n = len(views), views[0].shape[0]
    dtype = views[0].dtype
    rows = max(1, min(GRAM_BLOCK_ROWS, GRAM_BLOCK_ELEMENTS // (D * n)))
    diag = torch.empty(D, rows * rows, dtype=dtype)
    right = torch.empty(D, rows * n, dtype=dtype)
    inner = torch.zeros(D, D, dtype=torch.float64)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        m, rest = end - start, n - end
        for i, x in enumerate(views):
            block = x[start:end]  # [m, d_i]
            torch.mm(block, block.T, out=diag[i, :m * m].view(m, m))
            if rest:
                torch.mm(block, x[end:].T, out=right[i, :m * rest].view(m, rest))
        inner += _gram_products(diag[:, :m * m])
        if rest:
            inner += 2 * _gram_products(right[:, :m * rest])
    return inner


def _gram_products(flat: torch.Tensor, chunk: int = INNER_CHUNK) -> torch.Tensor:
    """All inner products of the rows of flat [D, k]: [D, D] float64.

    A float32 dot product over a whole block (k ~ 10^5) drifts by ~1e-6 relative;
    chunks of `chunk` elements, each a small float32 product, summed in float64, stay
    near 1e-8 and cost less than converting the block to float64.
    """
    D, k = flat.shape
    whole = k - k % chunk
    pieces = flat[:, :whole].reshape(D, whole // chunk, chunk).transpose(0, 1)  # [k // chunk, D, chunk]
    inner = torch.bmm(pieces, pieces.transpose(1, 2)).sum(0, dtype=torch.float64)
    tail = flat[:, whole:]
    return inner + (tail @ tail.T).double()


def _hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012) of Gram matrices [m, m] with zeroed diagonals."""
    m = k.shape[0]
    one = torch.ones(m, 1, dtype=k.dtype)
    trace = (k * l).sum()
    middle = (one.T @ k @ one) * (one.T @ l @ one) / ((m - 1) * (m - 2))
    last = 2 * (one.T @ k @ l @ one) / (m - 2)
    return (trace + middle - last).squeeze() / (m * (m - 3))


def _hsic1_all(grams: torch.Tensor) -> torch.Tensor:
    """`_hsic1` for every pair of D Gram matrices [D, m, m] (zeroed diagonals): [D, D].

    tr(K L) = <K, L> for symmetric L, 1^T K 1 is a sum, 1^T K L 1 = (K 1) . (L 1): three
    batched products instead of D^2 / 2 separate ones.
    """
    D, m = grams.shape[0], grams.shape[-1]
    flat = grams.reshape(D, m * m)
    sums = flat.sum(-1)  # [D] 1^T K 1
    row_sums = grams.sum(-1)  # [D, m] K 1
    middle = sums[:, None] * sums[None, :] / ((m - 1) * (m - 2))
    last = 2 * (row_sums @ row_sums.T) / (m - 2)
    return (flat @ flat.T + middle - last) / (m * (m - 3))


def _cka_minibatch(reps: Sequence[torch.Tensor], minibatch: int) -> torch.Tensor:
    """CKA = mean HSIC_1(K, L) / sqrt(mean HSIC_1(K, K) mean HSIC_1(L, L)) over disjoint
    random minibatches of `minibatch` samples (the last partial one is left out): [D, D]."""
    total = reps[0].shape[0]
    if not 4 <= minibatch <= total:
        raise AnalysisError(
            f"The CKA minibatch must hold between 4 and {total} samples (the number available); got {minibatch}.")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(0))
    hsic = torch.zeros(len(reps), len(reps), dtype=torch.float64)
    for start in range(0, total - minibatch + 1, minibatch):
        idx = perm[start:start + minibatch]
        grams = torch.stack([_zero_diagonal_gram(r[idx].double()) for r in reps])  # [D, m, m]
        hsic += _hsic1_all(grams)
    diag = hsic.diagonal().clamp_min(1e-30).sqrt()
    return hsic / (diag[:, None] * diag[None, :])


def _zero_diagonal_gram(x: torch.Tensor) -> torch.Tensor:
    """x x^T with a zeroed diagonal, for x [m, d]: [m, m]."""
    gram = x @ x.T
    return gram.fill_diagonal_(0)


__all__ = ["CKA_EXACT_MAX_TOKENS", "CKA_MINIBATCH", "CkaForm", "check_representations", "cheaper_form",
           "cka_matrix", "form_flops", "linear_cka"]
