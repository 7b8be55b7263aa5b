"""Quantization (METHODS §5): exact agreement with torch's FP8 casts, reference errors on a
seeded Gaussian matrix, codes and storage by hand, LLM.int8 at its two limits, activation
quantization inside the edited copy's forward, and the base model left alone. QuantEase,
mixed precision and the int8 kernel: tests/test_quant_calibration.py."""

import pytest
import torch

from analysis.compress.edits import from_dict
from analysis.compress.prune.pruning import Magnitude
from analysis.compress.quant.formats import (
    E4M3,
    E5M2,
    FORMATS,
    NF4_CODES,
    fake_quantize,
    fit_grid,
    group_columns,
    minifloat_round,
    minifloat_values,
    nf4_index,
    quantize_activations,
    relative_mse,
)
from analysis.compress.quant.quantize import LLMInt8, Quantize, find_outliers, llm_int8_linear, shared_group
from analysis.compress.recipe import Recipe, build
from lib import data
from lib.errors import CapabilityError, RecipeError
from lib.image_handle import TorchHandle

FLOAT8 = [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)]


@pytest.fixture(scope="module")
def tokens(tiny_lm):
    return data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=2).tokens


@pytest.fixture(scope="module")
def gaussian():
    return torch.randn(256, 512, generator=torch.Generator().manual_seed(0))


def edited(base, *edits):
    return build(base, Recipe(base.fingerprint, list(edits)))


def permanent_hooks(handle):
    return sum(len(m._forward_pre_hooks) for m in handle._linear_modules().values())


# ---------------------------------------------------------------------- formats


@pytest.mark.parametrize("name, dtype", [("fp8-e4m3", torch.float8_e4m3fn), ("fp8-e5m2", torch.float8_e5m2)])
def test_fp8_fake_quant_is_torchs_cast_round_trip(gaussian, name, dtype):
    fmt = FORMATS[name]
    scale = fit_grid(gaussian, fmt).scale  # [1, 1]: one scale for the tensor
    limit = fmt.minifloat.max_value
    expected = (gaussian / scale).clamp(-limit, limit).to(dtype).float() * scale
    assert torch.equal(fake_quantize(gaussian, name), expected)


def test_nf4_table_lookup_equals_bucketize():
    middles = (NF4_CODES[1:] + NF4_CODES[:-1]) / 2
    g = torch.Generator().manual_seed(2)
    up, down = torch.nextafter(middles, torch.tensor(2.0)), torch.nextafter(middles, torch.tensor(-2.0))
    edges = torch.cat([middles, up, down, NF4_CODES, torch.tensor([-1.0, 1.0, 0.0, -0.0])])
    u = torch.cat([torch.rand(1_000_000, generator=g) * 2 - 1, edges])
    assert torch.equal(nf4_index(u), torch.bucketize(u, middles))


@pytest.mark.parametrize("fmt, dtype", FLOAT8)
def test_minifloat_rounding_agrees_with_torch_casts(fmt, dtype):
    g = torch.Generator().manual_seed(1)
    n = 100_000
    magnitudes = torch.exp2(torch.empty(n).uniform_(-2 - fmt.bias - fmt.man_bits, 2 + fmt.bias + 1, generator=g))
    x = torch.randn(n, generator=g).sign() * magnitudes  # from below the smallest subnormal to beyond the max
    values = minifloat_values(fmt)
    ties = (values[1:] + values[:-1]) / 2  # exactly half-way: round half to even decides
    x = torch.cat([x, ties, -ties, torch.tensor([0.0, fmt.max_value, 2 * fmt.max_value, -1e30])])
    expected = x.clamp(-fmt.max_value, fmt.max_value).to(dtype).float()
    assert torch.equal(minifloat_round(x, fmt), expected)
    smallest_normal = 2.0 ** (1 - fmt.bias)
    assert int(((x.abs() < smallest_normal) & (expected != 0)).sum()) > 1000  # subnormals were exercised
    assert int((x.abs() > fmt.max_value).sum()) > 1000  # and saturation


@pytest.mark.parametrize("fmt, dtype", FLOAT8)
def test_minifloat_values_are_every_finite_value_of_the_dtype(fmt, dtype):
    every = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    finite = every[torch.isfinite(every) & (every >= 0)].unique()
    assert torch.equal(minifloat_values(fmt), finite)


@pytest.mark.parametrize("name, reference", [
    ("int8", 5.6e-5), ("int4", 1.0e-2), ("nf4", 8.5e-3), ("fp8-e4m3", 7e-4), ("fp8-e5m2", 2.7e-3), ("fp6-e3m2", 2.8e-3),
])
def test_relative_mse_matches_the_methods_reference(gaussian, name, reference):
    assert relative_mse(gaussian, fake_quantize(gaussian, name)) == pytest.approx(reference, rel=0.1)


def test_binary_relative_mse_is_one_minus_two_over_pi(gaussian):
    assert abs(relative_mse(gaussian, fake_quantize(gaussian, "binary")) - 0.363) < 0.01
    w = torch.tensor([[0.0, -2.0, 1.0, 3.0]])  # alpha = 1.5, sign(0) = +1
    assert torch.equal(fake_quantize(w, "binary"), torch.tensor([[1.5, -1.5, 1.5, 1.5]]))


def test_nf4_uses_exactly_the_16_codes(gaussian):
    grid = fit_grid(gaussian, FORMATS["nf4"])
    codes = grid.codes(gaussian)
    assert torch.equal(codes.unique(), torch.arange(16.0))
    per_block = (grid.quantize(gaussian) / grid.scale.repeat_interleave(64, dim=1))
    assert torch.isin(per_block.round(decimals=5), NF4_CODES.round(decimals=5)).all()


def test_int4_codes_stay_in_range_and_zeros_stay_zero():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    w[0, :128] += 5.0  # a group above zero: 0 is kept on its grid all the same
    w[1, 7] = 40.0  # an outlier
    w[:, ::3] = 0.0  # pruned weights
    for name, lo, hi in (("int4", 0, 15), ("int4-sym", -8, 7)):
        grid = fit_grid(w, FORMATS[name])
        codes = grid.codes(w)
        assert codes.min() >= lo and codes.max() <= hi and torch.equal(codes, codes.round())
        assert (grid.quantize(w)[:, ::3] == 0).all()


def test_group_sizes():
    assert group_columns(FORMATS["int4"], 640) == 128
    assert group_columns(FORMATS["int4"], 160) == 80  # the zoo LM's width: the largest divisor below 128
    assert group_columns(FORMATS["nf4"], 288) == 48
    assert group_columns(FORMATS["int4"], 9) == 9  # a row shorter than a group is one group
    assert group_columns(FORMATS["int4"], 257) == 257  # no useful divisor: the whole row
    assert group_columns(FORMATS["int8"], 512) == 512 and group_columns(FORMATS["fp8-e4m3"], 512) == -1
    with pytest.raises(RecipeError, match="A group of 100 does not divide rows of length 256"):
        group_columns(FORMATS["int4"], 256, 100)


def one_layer_handle(out: int, inp: int) -> TorchHandle:
    class OneLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = torch.nn.ModuleDict({"head": torch.nn.Linear(inp, out)})

        def forward(self, x):
            return self.stages["head"](x)

    torch.manual_seed(0)
    return TorchHandle("one layer", OneLayer(), "image-classifier", "one layer")


def test_size_accounting_by_hand():
    """Linear 256 -> 4 with a bias. INT4 g128: 4 * 256 codes of 4 bits = 4096, 4 rows x 2
    groups of a 16-bit scale and a 4-bit zero point = 160; the float32 bias 4 * 32 = 128."""
    base = one_layer_handle(4, 256)
    assert base.size_bits == 4 * 256 * 32 + 128
    int4 = edited(base, Quantize("int4"))
    assert int4.storage["head.weight"].format == "int4 g128"
    assert int4.size_bits == 4096 + 160 + 128
    int8 = edited(base, Quantize("int8"))  # 8 bits per weight, a 16-bit scale per row
    assert int8.size_bits == 4 * 256 * 8 + 4 * 16 + 128
    fp8 = edited(base, Quantize("fp8-e4m3"))  # one scale for the tensor
    assert fp8.size_bits == 4 * 256 * 8 + 16 + 128 and fp8.storage["head.weight"].format == "fp8-e4m3 per-tensor"
    nf4_g32 = edited(base, Quantize("nf4", group_size=32))
    assert nf4_g32.size_bits == 4 * 256 * 4 + 4 * 8 * 16 + 128


# ---------------------------------------------------------------------- LLM.int8


def test_llm_int8_at_its_limits():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, generator=g)
    x[..., [3, 11]] *= 20  # two outlier features
    w, b = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    plain = torch.nn.functional.linear(quantize_activations(x, FORMATS["int8"]), fake_quantize(w, "int8"), b)
    assert torch.equal(llm_int8_linear(x, w, b, threshold=float(x.abs().max()) + 1), plain)
    assert torch.equal(llm_int8_linear(x, w, b, threshold=0.0), torch.nn.functional.linear(x, w, b))
    middle = llm_int8_linear(x, w, b, threshold=10.0)
    exact = torch.nn.functional.linear(x, w, b)
    assert (middle - exact).abs().max() < (plain - exact).abs().max()  # outliers in 16-bit help


def test_llm_int8_edit_at_its_limits_and_its_outlier_report(tiny_lm, tokens):
    never = edited(tiny_lm, LLMInt8(threshold=1e9))
    w8a8 = edited(tiny_lm, Quantize("int8", activations=True))
    assert torch.equal(never.forward(tokens), w8a8.forward(tokens))
    always = edited(tiny_lm, LLMInt8(threshold=0.0))
    assert torch.equal(always.forward(tokens), tiny_lm.forward(tokens))
    names = ["blocks.0.mlp.in", "blocks.2.attn.o"]  # LayerNorm outputs reach ~3, attention outputs ~0.3
    report = find_outliers(tiny_lm, tokens, names, threshold=2.5)
    assert report.layers == tuple(names) and report.widths == (32, 32)
    assert 0 < len(report.columns[0]) < 32 and report.columns[1] == () and report.peaks[1] < 2.5
    copy = edited(tiny_lm, LLMInt8(2.5, "layers", (0,)))
    split = copy.input_transforms["blocks.0.mlp.in"]
    assert split.columns == find_outliers(tiny_lm, None, ["blocks.0.mlp.in"], 2.5).columns[0]
    n_kept = len(split.columns)
    assert copy.storage["blocks.0.mlp.in.weight"].bits == 128 * (32 - n_kept) * 8 + 128 * 16 + 128 * n_kept * 16


# ---------------------------------------------------------------------- edits on models


def test_quantized_weights_lie_on_the_grid_and_the_base_is_untouched(tiny_lm, tokens):
    before = tiny_lm.forward(tokens)
    for edit in (Quantize("int4", "mlp"), Quantize("nf4"), Quantize("binary", "attention"), LLMInt8()):
        copy = edited(tiny_lm, edit)
        assert copy.fingerprint != tiny_lm.fingerprint
    copy = edited(tiny_lm, Quantize("int4", "mlp"))
    for name, w in copy.linear_layers().items():
        original = tiny_lm.linear_layers()[name]
        if ".mlp." in name:
            assert torch.equal(w, fake_quantize(original, "int4").view(w.shape))
            assert copy.storage[copy.weight_name(name)].format == "int4 per-row"  # rows of 32 and 128: one group
        else:
            assert torch.equal(w, original)
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint
    assert tiny_lm.storage == {} and tiny_lm.input_transforms == {} and permanent_hooks(tiny_lm) == 0
    assert torch.equal(tiny_lm.forward(tokens), before)


def test_activation_quantization_runs_in_the_copys_forward_and_survives_copies(tiny_lm, tokens):
    weights_only = edited(tiny_lm, Quantize("int8"))
    w8a8 = edited(tiny_lm, Quantize("int8", activations=True))
    assert torch.equal(w8a8.linear_layers()["blocks.1.mlp.in"], weights_only.linear_layers()["blocks.1.mlp.in"])
    assert w8a8.fingerprint != weights_only.fingerprint  # same weights, another function
    # the same inputs quantized by hand, through the temporary capability, on the weights-only copy
    by_hand = {n: (lambda x: quantize_activations(x, FORMATS["int8"])) for n in w8a8.input_transforms}
    with weights_only.transforming_inputs(by_hand):
        reference = weights_only.forward(tokens)
    out = w8a8.forward(tokens)
    assert torch.equal(out, reference) and not torch.equal(out, weights_only.forward(tokens))
    again = w8a8.private_copy()  # the lab copies cached copies: the transform is part of the definition
    assert torch.equal(again.forward(tokens), out) and again.fingerprint == w8a8.fingerprint
    assert permanent_hooks(again) == permanent_hooks(w8a8) == 12 and permanent_hooks(tiny_lm) == 0
    assert permanent_hooks(weights_only) == 0  # the temporary hooks went with their block


def test_input_transform_hooks_go_when_the_body_raises(tiny_lm, tokens):
    with pytest.raises(RuntimeError, match="inside the block"):
        with tiny_lm.transforming_inputs({"blocks.0.mlp.in": lambda x: x * 0}):
            assert permanent_hooks(tiny_lm) == 1
            raise RuntimeError("inside the block")
    assert permanent_hooks(tiny_lm) == 0
    with pytest.raises(CapabilityError, match="no linear layer"):
        with tiny_lm.transforming_inputs({"blocks.9.mlp.in": lambda x: x}):
            pass
    with pytest.raises(RecipeError, match="never on a loaded base model"):
        tiny_lm.set_input_transform_("blocks.0.mlp.in", lambda x: x)


def test_bridge_paths_refuse_a_copy_whose_inputs_are_quantized_and_export_says_so(tiny_lm, tokens):
    """TransformerLens' forward does not pass through the plain model's pre-hooks, so what
    runs through it would silently skip the activation quantization: it is refused; one
    block runs the plain model's own layer, pre-hooks included, so chained blocks give the
    copy's forward; a checkpoint folder cannot hold it, so the exported zip carries a note
    saying so."""
    import io
    import zipfile

    from analysis.compress.export import NOTE_FILE, model_zip
    from lib.handle import Point

    w8a8 = edited(tiny_lm, Quantize("int8", "mlp", activations=True))
    with pytest.raises(CapabilityError, match="quantizes the inputs of 6 linear layer"):
        w8a8.record(tokens, [Point("resid_pre", 1)])
    h = tiny_lm.record(tokens, [Point("resid_pre", 0)])[Point("resid_pre", 0)]
    for layer in range(w8a8.structure.n_layers):
        h = w8a8.blocks.run(layer, h)
    torch.testing.assert_close(w8a8.blocks.readout(h), w8a8.forward(tokens))
    assert not torch.allclose(w8a8.forward(tokens), tiny_lm.forward(tokens))  # the quantized inputs count
    weights_only = edited(tiny_lm, Quantize("int8", "mlp"))
    assert Point("resid_pre", 1) in weights_only.record(tokens, [Point("resid_pre", 1)])
    names = {n: zipfile.ZipFile(io.BytesIO(model_zip(m, "m"))).namelist() for n, m in
             (("w8a8", w8a8), ("weights", weights_only))}
    assert f"m/{NOTE_FILE}" in names["w8a8"] and f"m/{NOTE_FILE}" not in names["weights"]


def test_input_transform_changes_exactly_that_layers_input():
    handle = one_layer_handle(3, 5)
    x = torch.randn(4, 5)
    weight, bias = handle.model.stages["head"].weight, handle.model.stages["head"].bias
    with handle.transforming_inputs({"head": lambda t: 2 * t}):
        doubled = handle.forward(x)
    assert torch.allclose(doubled, torch.nn.functional.linear(2 * x, weight, bias))
    assert permanent_hooks(handle) == 0


def test_quantization_stacks_with_pruning_in_either_order(tiny_lm):
    pruned_first = edited(tiny_lm, Magnitude(0.5, "mlp"), Quantize("int4", "mlp"))
    pruned = edited(tiny_lm, Magnitude(0.5, "mlp"))
    for name, w in pruned_first.linear_layers().items():
        if ".mlp." in name:
            assert int((w == 0).sum()) >= int((pruned.linear_layers()[name] == 0).sum())  # zeros stay zeros
    quantized_first = edited(tiny_lm, Quantize("int4", "mlp"), Magnitude(0.5, "mlp"))
    assert quantized_first.size_bits == pruned_first.size_bits < pruned.size_bits


def test_activation_quantization_stacks_with_removed_parts_in_either_order(tiny_lm, tokens):
    from analysis.compress.prune.pruning import Drop

    first = edited(tiny_lm, Quantize("int8", activations=True), Drop("mlp", 1))
    then = edited(tiny_lm, Drop("mlp", 1), Quantize("int8", activations=True))
    assert torch.equal(first.forward(tokens), then.forward(tokens))
    assert first.fingerprint == then.fingerprint  # the removed MLP's input transforms count for nothing
    assert not torch.equal(then.forward(tokens), edited(tiny_lm, Drop("mlp", 1), Quantize("int8")).forward(tokens))


@pytest.mark.parametrize("edit, message", [
    (lambda: Quantize("int3"), "Unknown quantization format 'int3'"),
    (lambda: Quantize("int4", activations=True), "Activations are quantized to int8, fp8-e4m3, fp8-e5m2 only"),
    (lambda: Quantize("int4", group_size=0), "whole number of columns"),
    (lambda: Quantize("int4", method="gptq"), "one of rtn, quantease"),
    (lambda: Quantize("int4", "heads"), "scope is one of"),
    (lambda: LLMInt8(-1.0), "threshold is a number >= 0"),
    (lambda: from_dict({"type": "quantize", "format": "fp16"}), "Unknown quantization format 'fp16'"),
])
def test_bad_quantize_edits_are_refused(edit, message):
    with pytest.raises(RecipeError, match=message):
        edit()


def test_group_sizes_that_do_not_divide_the_layer_are_refused(tiny_lm):
    with pytest.raises(RecipeError, match="blocks.0.attn.qkv: A group of 24 does not divide rows of length 32"):
        edited(tiny_lm, Quantize("int4", group_size=24))


def test_quantize_json_round_trip(tiny_lm):
    recipe = Recipe(tiny_lm.fingerprint, [Quantize("nf4", "layers", (1, 2), 16, method="quantease"),
                                          Quantize("int8", activations=True), LLMInt8(4.0)])
    back = Recipe.from_json(recipe.to_json())
    assert back.edits == recipe.edits and back.digest == recipe.digest


def test_image_model_quantizes_convolutions_and_their_inputs(tmp_path):
    from lib.models import load_model, save_image_model
    from lib.zoo.nets import DigitsCNN

    torch.manual_seed(0)
    save_image_model(DigitsCNN(width=4), "digits-cnn", tmp_path, width=4)
    base = load_model(str(tmp_path))
    images = data.digits_batch(n=8).images
    copy = edited(base, Quantize("fp8-e4m3", activations=True), Quantize("int4", "layers", ("fc1",)))
    assert copy.storage["conv2.0.weight"].format == "fp8-e4m3 per-tensor"
    assert copy.storage["fc1.0.weight"].format == "int4 per-row"  # rows of 32: one group
    assert set(copy.input_transforms) == set(base.linear_layers())
    assert torch.equal(copy.private_copy().forward(images), copy.forward(images))
    assert base.current_fingerprint() == base.fingerprint and permanent_hooks(base) == 0


@pytest.mark.parametrize("rows, group", [((160, 640), 80), ((160, 640, 120), 40), ((768, 3072), 128),
                                         ((2048, 8192), 128), ((32, 128), None), ((9, 288), None)])
def test_one_step_shares_one_group_size_across_layers(rows, group):
    """code-lm's rows of 160 and 640 share groups of 80 (one exported scheme); rows that all fit
    one default group keep a scale per row; a CNN's 9-wide rows keep their own groups."""
    assert shared_group(FORMATS["int4"], rows) == group
    if group:
        assert all(r % group == 0 for r in rows)
    assert shared_group(FORMATS["int8"], rows) is None  # int8 has a scale per row, no groups
