"""Calibrated quantization and its neighbours (METHODS §5): QuantEase against
round-to-nearest, per-layer sensitivity and mixed precision, a layer's histogram on its
grid and the other figures, torch's real int8 kernel and the simulation beside it."""

import pytest
import torch

from analysis.compress.quant.calibration import compare_methods, layer_error, quantease
from analysis.compress.quant.formats import FORMATS, fit_grid
from analysis.compress.quant.mixed_precision import allocate, sensitivity
from analysis.compress.quant.quantize import Quantize, find_outliers
from analysis.compress.recipe import Recipe, build
from lib import data
from lib.errors import RecipeError


@pytest.fixture(scope="module")
def tokens(tiny_lm):
    return data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=2).tokens


def edited(base, *edits):
    return build(base, Recipe(base.fingerprint, list(edits)))


# ---------------------------------------------------------------------- calibration, mixed precision


def test_quantease_with_uncorrelated_inputs_is_round_to_nearest():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    grid = fit_grid(w, FORMATS["int4"], 32)
    sigma = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(5)) + 0.5)  # no coupling
    assert torch.equal(quantease(w, sigma, grid), grid.quantize(w))


def test_quantease_beats_round_to_nearest_on_the_layers_inputs(tiny_lm, tokens):
    names = ["blocks.0.mlp.in", "blocks.1.mlp.in", "blocks.2.attn.qkv"]
    result = compare_methods(tiny_lm, tokens, "int4", names)
    assert all(q <= r for q, r in zip(result.quantease, result.rtn))
    assert result.mean_quantease < 0.8 * result.mean_rtn
    copy = edited(tiny_lm, Quantize("int4", "layers", (0,), method="quantease"))
    w_hat = copy.linear_layers()["blocks.0.mlp.in"]
    original = tiny_lm.linear_layers()["blocks.0.mlp.in"]
    grid = fit_grid(original, FORMATS["int4"])
    assert torch.equal(grid.quantize(w_hat), w_hat)  # on the grid round-to-nearest uses
    sigma = tiny_lm.input_grams(data.default_batch(tiny_lm).tokens, ["blocks.0.mlp.in"])["blocks.0.mlp.in"]
    rtn = grid.quantize(original)
    assert layer_error(original, w_hat, sigma) < layer_error(original, rtn, sigma)


def test_sensitivity_and_allocation(tiny_lm):
    batch = data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=2)
    sens = sensitivity(tiny_lm, batch, "int4", group_size=16)
    assert sens.units == (0, 1, 2) and all(d > 0 for d in sens.drops)
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint
    small = allocate(tiny_lm, batch, sens, "int4", "int8", budget_bits=tiny_lm.size_bits)  # everything fits
    assert small.n_high == 3 and small.formats == ("int8",) * 3 and small.met
    all_int8 = edited(tiny_lm, *small.edits).size_bits
    tight = allocate(tiny_lm, batch, sens, "int4", "int8", budget_bits=all_int8 - 1)
    assert tight.n_high == 2 and tight.formats[sens.units.index(sens.order()[-1])] == "int4"
    assert edited(tiny_lm, *tight.edits).size_bits == tight.size_bits  # sizes are computed exactly
    loose = allocate(tiny_lm, batch, sens, "int4", None, max_drop=10.0)
    assert loose.n_high == 0 and loose.met and loose.formats == ("int4",) * 3
    strict = allocate(tiny_lm, batch, sens, "int4", None, max_drop=0.0)
    assert strict.n_high == 3 and strict.drop == 0.0 and strict.edits == ()
    with pytest.raises(RecipeError, match="either a size budget or a tolerated quality drop"):
        allocate(tiny_lm, batch, sens)


# ---------------------------------------------------------------------- figures, real kernel


def test_histogram_with_the_grid_and_the_other_figures(tiny_lm, tokens):
    from analysis.compress.quant import plots as plots_quant
    from analysis.compress.quant.quantize import layer_histogram

    hist = layer_histogram(tiny_lm, "blocks.0.mlp.in", "int4")
    assert hist.grid == tuple(float(v) for v in range(16)) and sum(hist.counts) == 128 * 32
    fig = plots_quant.grid_histogram(hist)
    assert fig.data[1].mode == "lines" and len(fig.data[1].x) == 3 * 16  # one dotted line per grid value
    fp8 = layer_histogram(tiny_lm, "blocks.0.mlp.in", "fp8-e4m3")
    assert len(fp8.grid) > 40 and plots_quant.grid_histogram(fp8).data[1].mode == "markers"
    with pytest.raises(RecipeError, match="no linear layer 'blocks.7.mlp.in'"):
        layer_histogram(tiny_lm, "blocks.7.mlp.in", "int4")
    report = find_outliers(tiny_lm, tokens, ["blocks.0.mlp.in", "blocks.1.mlp.in"], 2.5)
    assert list(plots_quant.outlier_bars(report).data[0].y) == [len(c) for c in report.columns]


def test_int8_kernel_runs_the_model_close_to_float(tiny_lm):
    from analysis.compress.quant.kernels import int8_kernel_comparison

    batch = data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=2)
    result = int8_kernel_comparison(tiny_lm, batch, repeats=3)
    layers = {n: w for n, w in tiny_lm.linear_layers().items() if n != "unembed"}
    assert set(result.layers) == set(layers)  # the tied unembedding stays in float
    assert result.int8_bytes == sum(w.numel() + 12 * w.shape[0] for w in layers.values())  # codes, scale, zero, bias
    assert result.float_bytes == sum(4 * (w.numel() + w.shape[0]) for w in layers.values())
    assert 0 < result.metrics.kl_to_base < 0.01 and result.metrics.agreement > 0.9
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint


def test_simulated_int8_of_the_kernels_layers(tiny_lm):
    from analysis.compress.quant.kernels import simulated_int8

    batch = data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=2)
    layers = [n for n in tiny_lm.linear_layers() if n != "unembed"]  # the layers the kernel converts
    simulated = simulated_int8(tiny_lm, batch, layers)
    weights = sum(tiny_lm.linear_layers()[n].numel() for n in layers)
    assert 8 * weights < simulated.bits < 9 * weights  # int8 codes plus 16-bit scales, those layers only
    assert 0 <= simulated.metrics.kl_to_base < 0.01 and simulated.metrics.agreement > 0.9
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint
