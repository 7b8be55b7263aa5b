"""Linear CKA: both exact forms against a brute-force HSIC, the form chooser, the
minibatch estimator, and the inputs CKA refuses."""

import pytest
import torch

from analysis.redundancy import cka
from lib.errors import AnalysisError


def brute_force_cka(reps: list[torch.Tensor]) -> torch.Tensor:
    """METHODS §1 literally, in float64: H = I - 11^T / N, K = X X^T, HSIC = tr(K H L H),
    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) on the raw (uncentred) X: [D, D]."""
    n = reps[0].shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1 / n, dtype=torch.float64)
    kh = [(x.double() @ x.double().T) @ h for x in reps]  # K H, [N, N] each
    hsic = torch.tensor([[float((a * b.T).sum()) for b in kh] for a in kh], dtype=torch.float64)  # tr(KH LH)
    return hsic / (hsic.diagonal().sqrt()[:, None] * hsic.diagonal().sqrt()[None, :])


def related(n: int, widths: list[int], seed: int = 0) -> list[torch.Tensor]:
    """float32 representations [n, w] that share structure (a noisy stream), with
    columns far from zero mean like residual-stream features."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, max(widths), generator=gen)
    reps = []
    for w in widths:
        h = h + 0.7 * torch.randn(h.shape, generator=gen) @ torch.randn(h.shape[1], h.shape[1], generator=gen) / 8
        reps.append((h[:, :w] + 50 * torch.randn(w, generator=gen)).float())
    return reps


@pytest.fixture
def small_blocks(monkeypatch):
    """Several uneven Gram row blocks and inner-product chunks with a remainder."""
    monkeypatch.setattr(cka, "GRAM_BLOCK_ROWS", 37)
    monkeypatch.setattr(cka, "INNER_CHUNK", 100)


@pytest.mark.parametrize("blocks", ["one-block", "small-blocks"])
@pytest.mark.parametrize("widths", [[24, 24, 24, 24], [64, 8, 33]], ids=["equal", "mixed"])
def test_both_forms_equal_brute_force(request, blocks, widths):
    if blocks == "small-blocks":
        request.getfixturevalue("small_blocks")
    reps = related(150, widths)
    reference = brute_force_cka(reps)
    gram, feature = cka.cka_matrix(reps, form="gram"), cka.cka_matrix(reps, form="feature")
    assert gram.dtype == feature.dtype == torch.float64
    assert torch.allclose(gram, reference, rtol=0, atol=1e-6)
    assert torch.allclose(feature, reference, rtol=0, atol=1e-6)
    assert torch.allclose(gram, feature, rtol=0, atol=1e-6)
    assert reference[0, 1] < 0.99  # the representations are related, not identical
    pair = cka.linear_cka(reps[0], reps[-1])
    assert abs(pair - float(reference[0, -1])) < 1e-9


def test_float64_inputs_are_computed_in_float64():
    reps = [r.double() for r in related(80, [12, 20, 5], seed=3)]
    reference = brute_force_cka(reps)  # K H of uncentred columns (mean ~50) cancels ~5 digits
    for form in ("gram", "feature"):
        assert torch.allclose(cka.cka_matrix(reps, form=form), reference, rtol=0, atol=1e-9)


def test_both_forms_equal_brute_force_on_code_lm_residuals(small_blocks):
    from lib.data import default_batch
    from lib.handle import Point
    from lib.models import load_model

    handle = load_model("zoo:code-lm")
    batch = default_batch(handle, n_windows=4, seq_len=128)
    L = handle.structure.n_layers
    _, cache = handle.run_with_cache(batch.tokens, [Point("resid_pre", layer) for layer in range(L)])
    d = handle.structure.d_model
    reps = [cache[Point("resid_pre", layer)].reshape(-1, d) for layer in range(L)]  # [N, d], sink positions kept
    assert reps[0].dtype == torch.float32
    reference = brute_force_cka(reps)
    assert cka.cheaper_form(reps[0].shape[0], [d] * L) == "gram"
    for form in ("gram", "feature", None):
        assert torch.allclose(cka.cka_matrix(reps, form=form), reference, rtol=0, atol=1e-6)
    assert reference.min() < 0.9  # depths differ


def test_half_precision_inputs_are_computed_in_float32():
    reps = [r.bfloat16() for r in related(60, [16, 16], seed=5)]
    reference = brute_force_cka([r.float() for r in reps])
    assert torch.allclose(cka.cka_matrix(reps, form="gram"), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("form", ["gram", "feature"])
def test_self_cka_is_one_off_the_diagonal(form):
    """x, a rotation of x, and a scaled and shifted x: every pair is the same
    representation up to the invariances of linear CKA."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, 32, generator=gen) + 4
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=torch.float64))
    mat = cka.cka_matrix([x, (x.double() @ q).float(), 3 * x - 7], form=form)
    assert torch.allclose(mat, torch.ones(3, 3, dtype=torch.float64), rtol=0, atol=1e-6)


def test_chooser_picks_the_form_with_fewer_flops():
    bench = (992, [768] * 13)  # N, widths: Gram form ~ 1/9 of the feature form's flops
    flops = cka.form_flops(*bench)
    assert flops["gram"] < flops["feature"] / 5
    assert cka.cheaper_form(*bench) == "gram"
    assert cka.cheaper_form(20_000, [768] * 13) == "feature"  # N far above d * D / 2
    assert cka.cheaper_form(4096, [64] * 13) == "feature"
    assert cka.cheaper_form(64, [64] * 13) == "gram"
    # image stages: the widths differ, and the wide input decides
    assert cka.cheaper_form(100, [784, 16 * 14 * 14, 32 * 7 * 7, 10]) == "gram"
    assert cka.cheaper_form(5000, [10, 10]) == "feature"


def test_feature_form_flops_use_each_width():
    """2 N sum_{i<=j} d_i d_j: pairs (1,1), (1,2), (2,2) at N = 3 -> 2 * 3 * (1 + 2 + 4)."""
    assert cka.form_flops(3, [1, 2])["feature"] == 2 * 3 * (1 + 2 + 4)


def test_minibatch_cka_estimates_the_exact_value():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6000, 8, generator=gen)
    y = x @ torch.randn(8, 8, generator=gen) + torch.randn(6000, 8, generator=gen)
    exact = cka.linear_cka(x, y)
    estimate = cka.cka_matrix([x, y], minibatch=500, exact_max=1000)
    assert abs(float(estimate[0, 1]) - exact) < 0.03
    assert abs(float(estimate[0, 0]) - 1) < 1e-9
    assert abs(float(cka.cka_matrix([x, y], exact_max=1000, form="gram")[0, 1]) - exact) < 1e-6


def test_batched_hsic_equals_the_pairwise_formula():
    gen = torch.Generator().manual_seed(4)
    grams = []
    for width in (5, 9, 3):
        x = torch.randn(40, width, generator=gen, dtype=torch.float64)
        grams.append((x @ x.T).fill_diagonal_(0))
    batched = cka._hsic1_all(torch.stack(grams))
    pairwise = torch.tensor([[float(cka._hsic1(k, l)) for l in grams] for k in grams], dtype=torch.float64)
    assert torch.allclose(batched, pairwise, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reps, fragment", [
    ([], "at least one representation"),
    ([torch.randn(1, 4), torch.randn(1, 4)], "at least two samples"),
    ([torch.randn(10, 4), torch.randn(9, 4)], "sample counts differ (10, 9)"),
    ([torch.randn(10, 4), torch.randn(10, 2, 2)], "representation 1 has shape (10, 2, 2)"),
    ([torch.randn(10, 4), torch.randn(10, 0)], "no features"),
], ids=["none", "one-sample", "unequal-counts", "not-a-matrix", "no-features"])
def test_bad_inputs_raise_analysis_error(reps, fragment):
    with pytest.raises(AnalysisError) as info:
        cka.cka_matrix(reps)
    assert fragment in str(info.value)
    if len(reps) == 2:
        with pytest.raises(AnalysisError, match="CKA"):
            cka.linear_cka(*reps)


def test_unknown_form_is_refused():
    with pytest.raises(AnalysisError, match="Unknown CKA form 'grams'"):
        cka.cka_matrix([torch.randn(10, 3), torch.randn(10, 3)], form="grams")


def test_minibatch_larger_than_the_samples_is_refused():
    with pytest.raises(AnalysisError, match="between 4 and 50"):
        cka.cka_matrix([torch.randn(50, 3), torch.randn(50, 3)], minibatch=64, exact_max=10)
