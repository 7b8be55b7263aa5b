"""Layer-adaptive sparsity: the rate-distortion DP against brute force, its budget met to the
weight and compared with uniform pruning at the same sparsity, the
evolutionary search's guarantees, and low-rank factors and layer sharing."""

import itertools

import numpy as np
import pytest
import torch

from analysis.compress.prune import allocation as alloc
from analysis.compress.prune.factorize import LowRank, ShareLayers, break_even_rank, truncated_svd
from analysis.compress.prune.pruning import Magnitude
from analysis.compress.recipe import Recipe, build
from lib import data
from lib.errors import AnalysisError, RecipeError
from lib.scoring import kl_and_agreement


def curves_by_hand() -> alloc.DistortionCurves:
    return alloc.DistortionCurves(
        ["a", "b", "c"], torch.tensor([100, 300, 600]), torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64),
        torch.tensor([[0, 1.0, 2.0, 9.0], [0, 0.1, 0.3, 5.0], [0, 0.5, 0.6, 0.7]], dtype=torch.float64))


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.37, 0.5, 0.7])
def test_dp_is_optimal_and_the_plan_meets_the_budget_exactly(sparsity):
    curves = curves_by_hand()
    target = round(sparsity * 1000)
    best = min((sum(float(curves.distortion[l, k]) for l, k in enumerate(ks)), ks)
               for ks in itertools.product(range(4), repeat=3)
               if sum(int(curves.sizes[l]) * float(curves.levels[k]) for l, k in enumerate(ks)) >= target)
    levels = alloc._dp_levels(curves, target, round(sparsity * alloc.DP_UNITS))  # units of half a weight: exact
    assert sum(float(curves.distortion[l, k]) for l, k in enumerate(levels.tolist())) == pytest.approx(best[0])
    plan = alloc.allocate(curves, sparsity)
    counts = [round(float(s) * int(n)) for s, n in zip(plan.sparsities, curves.sizes)]
    assert sum(counts) == target and plan.sparsity == target / 1000
    by_interp = sum(np.interp(c, (curves.levels * n).numpy(), d.numpy())
                    for c, n, d in zip(counts, curves.sizes.tolist(), curves.distortion))
    assert plan.predicted == pytest.approx(by_interp) and plan.predicted <= best[0] + 1e-12  # never worse than levels
    flat = alloc.uniform(curves, plan.sparsity)
    assert flat.sparsity == pytest.approx(plan.sparsity, abs=3 / 1000) and plan.predicted <= flat.predicted
    with pytest.raises(AnalysisError, match=r"fraction in \(0, 1\)"):
        alloc.allocate(curves, 1.0)
    with pytest.raises(AnalysisError, match="cannot be reached"):
        alloc.allocate(curves, 0.8)
    with pytest.raises(AnalysisError, match="cannot be reached"):
        alloc.uniform(curves, 0.8)


def test_remainder_goes_where_the_curves_rise_least():
    """At 10 %: the DP's levels (b at 0.5, 150 weights) overshoot the 100-weight budget; the
    50 given back come from b, whose curve falls fastest per weight (0.2 / 75 against 0 for a
    and c at level 0), so b ends at 100 of 300 weights."""
    plan = alloc.allocate(curves_by_hand(), 0.1)
    assert plan.sparsities.tolist() == [0.0, 1 / 3, 0.0]
    assert plan.predicted == pytest.approx(0.1 + 0.2 * 25 / 75)


def test_a_budget_lost_in_the_units_rounding_falls_back_to_the_last_levels():
    """Three layers of 10 weights, last level 5 each; 50 % is all 15. In 7 units of 15/7
    weights each level's 5 weights round to 2 units, so no plan reaches 7 units: the DP
    falls back to every layer at its last level, which does prune 15."""
    curves = alloc.DistortionCurves(["a", "b", "c"], torch.tensor([10, 10, 10]),
                                    torch.tensor([0.0, 0.5], dtype=torch.float64),
                                    torch.tensor([[0, 1.0], [0, 2.0], [0, 3.0]], dtype=torch.float64))
    assert alloc.allocate(curves, 0.5, units=14).sparsities.tolist() == [0.5, 0.5, 0.5]


@pytest.fixture(scope="module")
def lm_curves(tiny_lm):
    tokens = data.default_batch(tiny_lm, n_windows=2, seq_len=16).tokens
    return alloc.distortion_curves(tiny_lm, tokens, n_levels=12)  # up to 11/12, past the 90 % asked


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.9])
def test_realised_sparsity_is_the_target_and_uniform_compares_at_the_same(tiny_lm, lm_curves, sparsity):
    total = int(lm_curves.sizes.sum())
    target, slack = round(sparsity * total), len(lm_curves.layers)  # to one weight per layer
    plan = alloc.allocate(lm_curves, sparsity)
    assert abs(round(plan.sparsity * total) - target) <= slack
    weights = build(tiny_lm, Recipe(tiny_lm.fingerprint, [plan.edit()])).linear_layers()
    zeros = sum(int((weights[name] == 0).sum()) for name in plan.layers)
    assert abs(zeros - target) <= slack and zeros == round(plan.sparsity * total)  # the plan says what it prunes
    flat = alloc.uniform(lm_curves, plan.sparsity)
    assert abs(round(flat.sparsity * total) - target) <= slack
    assert plan.predicted <= flat.predicted
    # uniform is Magnitude pruning at that sparsity, layer by layer
    by_magnitude = build(tiny_lm, Recipe(tiny_lm.fingerprint, [Magnitude(plan.sparsity)])).linear_layers()
    by_uniform = build(tiny_lm, Recipe(tiny_lm.fingerprint, [flat.edit()])).linear_layers()
    assert all(torch.equal(by_uniform[name], by_magnitude[name]) for name in flat.layers)


def test_a_per_layer_sparsity_recipe_round_trips_through_json(tiny_lm, lm_curves):
    recipe = Recipe(tiny_lm.fingerprint, [alloc.allocate(lm_curves, 0.5).edit()])
    again = Recipe.from_json(recipe.to_json())  # JSON lists of [name, sparsity] pairs were refused
    assert again.edits == recipe.edits and again.digest == recipe.digest


@pytest.fixture(scope="module")
def cnn():
    from lib.models import load_model

    return load_model("zoo:digits-cnn")


def test_allocation_beats_uniform_pruning_on_the_digits_cnn(cnn):
    batch = data.default_batch(cnn)
    curves = alloc.distortion_curves(cnn, batch.images, n_levels=20)
    plan = alloc.allocate(curves, 0.7)
    total = int(curves.sizes.sum())
    assert round(plan.sparsity * total) == round(0.7 * total)
    from lib.metrics import evaluate

    allocated = evaluate(build(cnn, Recipe(cnn.fingerprint, [plan.edit()])), batch)
    uniform = evaluate(build(cnn, Recipe(cnn.fingerprint, [Magnitude(plan.sparsity)])), batch)
    assert allocated.accuracy > uniform.accuracy


def test_allocation_beats_uniform_on_code_lm_and_adds_up_at_low_sparsity():
    from lib.models import load_model

    handle = load_model("zoo:code-lm")
    tokens = data.default_batch(handle, n_windows=2, seq_len=64).tokens
    curves = alloc.distortion_curves(handle, tokens, n_levels=5)
    base = handle.forward(tokens)

    def kl(edit):
        return kl_and_agreement(build(handle, Recipe(handle.fingerprint, [edit])).forward(tokens), base,
                                data.TextBatch(tokens, 0, True, "t"))[0]

    plan = alloc.allocate(curves, 0.5)
    assert kl(plan.edit()) < kl(Magnitude(plan.sparsity))
    low = alloc.allocate(curves, 0.1)  # additivity: the summed single-layer distortions predict the total
    edited = build(handle, Recipe(handle.fingerprint, [low.edit()])).forward(tokens)
    measured = float((edited.float() - base.float()).pow(2).mean())
    assert measured == pytest.approx(alloc.measured_distortion(handle, tokens, low), rel=1e-5)
    assert low.predicted / 3 < measured < low.predicted * 3


def test_each_curve_point_is_that_layer_alone_pruned_by_magnitude(tiny_lm):
    tokens = data.default_batch(tiny_lm, n_windows=2, seq_len=16).tokens
    curves = alloc.distortion_curves(tiny_lm, tokens, n_levels=4)
    base = tiny_lm.forward(tokens).float()
    for i, name in [(0, curves.layers[0]), (5, curves.layers[5]), (len(curves.layers) - 1, curves.layers[-1])]:
        for k in (1, 3):
            edit = alloc.LayerSparsity(((name, float(curves.levels[k])),))
            out = build(tiny_lm, Recipe(tiny_lm.fingerprint, [edit])).forward(tokens).float()
            assert float(curves.distortion[i, k]) == pytest.approx(float((out - base).pow(2).mean()), rel=1e-4)
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint  # the base is untouched


def test_evolution_keeps_the_budget_never_gets_worse_and_repeats(cnn):
    images = data.default_batch(cnn).images
    curves = alloc.distortion_curves(cnn, images[:100], n_levels=10)
    fresh = lambda g: images[100 + 30 * g: 130 + 30 * g]  # noqa: E731

    def run():
        return alloc.evolve(cnn, images[:100], fresh, curves, 0.6, generations=4, offspring=3, seed=1)

    first = run()
    assert all(later <= earlier for earlier, later in zip(first.curve, first.curve[1:]))
    result, total = first.allocation(curves), int(curves.sizes.sum())
    assert round(result.sparsity * total) >= round(0.6 * total)
    assert torch.equal(run().levels, first.levels)
    snapshots = []
    stopped = alloc.evolve(cnn, images[:100], fresh, curves, 0.6, generations=4, offspring=3, seed=1,
                           on_generation=snapshots.append, stop=lambda: len(snapshots) == 2)
    assert len(stopped.curve) == 3 and stopped.curve == first.curve[:3]  # stopped after two generations
    assert snapshots[-1].curve == stopped.curve and torch.equal(snapshots[-1].levels, stopped.levels)


def test_low_rank_factors_are_the_truncated_svd(tiny_lm):
    tokens = data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=2).tokens
    full = build(tiny_lm, Recipe(tiny_lm.fingerprint, [LowRank(rank=32)]))  # full rank of 32-wide layers
    torch.testing.assert_close(full.forward(tokens), tiny_lm.forward(tokens), rtol=1e-4, atol=1e-4)
    w = tiny_lm.linear_layers()["blocks.0.mlp.in"]  # [128, 32]
    a, b = truncated_svd(w, 5)
    u, s, vh = torch.linalg.svd(w.double())
    torch.testing.assert_close((b @ a).double(), u[:, :5] @ torch.diag(s[:5]) @ vh[:5], rtol=1e-5, atol=1e-5)
    low = build(tiny_lm, Recipe(tiny_lm.fingerprint, [LowRank(rank=5, scope="mlp")]))
    per_layer = 5 * (32 + 128)  # r (in + out) instead of in * out; biases stay
    assert tiny_lm.n_params - low.n_params == 3 * 2 * (128 * 32 - per_layer)
    assert 5 < break_even_rank(128, 32) == 128 * 32 / 160


def test_layer_sharing(tiny_lm):
    tokens = data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=2).tokens
    exact = build(tiny_lm, Recipe(tiny_lm.fingerprint, [ShareLayers(0, 2, rank=32)]))
    torch.testing.assert_close(exact.forward(tokens), tiny_lm.forward(tokens), rtol=1e-4, atol=1e-4)
    pure = build(tiny_lm, Recipe(tiny_lm.fingerprint, [ShareLayers(0, 2, rank=0)]))
    block_weights = sum(w.numel() for n, w in tiny_lm.linear_layers().items() if n.startswith("blocks.2."))
    assert tiny_lm.n_params - pure.n_params == block_weights  # shared weights are stored once
    assert tiny_lm.size_bits - pure.size_bits == 32 * block_weights


@pytest.mark.parametrize("edit, message", [
    (lambda: LowRank(rank=0), "whole number > 0"),
    (lambda: LowRank(), "either a rank or an energy"),
    (lambda: LowRank(energy=1.5), r"fraction in \(0, 1\]"),
    (lambda: ShareLayers(1, 1), "with itself"),
    (lambda: ShareLayers(0, 1, rank=-1), "whole number >= 0"),
])
def test_bad_factorisation_edits(edit, message):
    with pytest.raises(RecipeError, match=message):
        edit()


def test_ranks_above_full_are_refused(tiny_lm):
    with pytest.raises(RecipeError, match="above the full rank 32"):
        build(tiny_lm, Recipe(tiny_lm.fingerprint, [LowRank(rank=33)]))
    with pytest.raises(RecipeError, match="above the full rank"):
        build(tiny_lm, Recipe(tiny_lm.fingerprint, [ShareLayers(0, 1, rank=40)]))


def test_allocation_figures_draw_from_results():
    from analysis.compress.prune import plots as plots_alloc

    curves = curves_by_hand()
    plan = alloc.allocate(curves, 0.5)
    fig = plots_alloc.distortion_curves(curves, plan)
    assert len(fig.data) == 4 and fig.layout.yaxis.type == "log"
    bars = plots_alloc.allocation_bars([plan, alloc.uniform(curves, plan.sparsity)])
    assert [t.name.split(" ")[0] for t in bars.data] == ["rate-distortion", "uniform"]
    assert plots_alloc.search_progress([0.3, 0.2, 0.2]).data[0].y == (0.3, 0.2, 0.2)
    assert plots_alloc.spectrum(torch.tensor([3.0, 2.0, 1.0]), "w", cut=2).layout.shapes
