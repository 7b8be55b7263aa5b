"""Linear interpreters (METHODS.md §3): exact affine maps of ReLU nets, the detached
linearisation of a transformer, and captum beside them."""

import copy

import pytest
import torch
from torch import nn

from analysis.interpreter import attributions as ic
from analysis.interpreter import gradients, relu
from analysis.interpreter import transformer as it
from lib.errors import CapabilityError, DataError
from lib.hooks import count_hooks
from lib.image_handle import TorchHandle
from lib.models import load_model


class StageNet(nn.Module):
    """A test network made of named stages, as TorchHandle expects."""

    def __init__(self, **stages: nn.Module) -> None:
        super().__init__()
        self.stages = nn.ModuleDict(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages.values():
            x = stage(x)
        return x


def _with_stats(bn: nn.Module) -> nn.Module:
    """Batch norm with random running statistics and affine parameters (a trained one, folded at eval)."""
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bn.num_batches_tracked = None  # a 0-d integer buffer lib.storage.weight_fingerprint cannot hash yet
    return bn


def _cnn() -> StageNet:
    """Every supported layer kind: batch norm, leaky ReLU, average and max pooling (padded, adaptive), dropout."""
    torch.manual_seed(0)
    return StageNet(
        conv1=nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), _with_stats(nn.BatchNorm2d(6)), nn.LeakyReLU(0.1)),
        pool1=nn.MaxPool2d(3, stride=2, padding=1),  # 4x4
        conv2=nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()),
        pool2=nn.AvgPool2d(2),  # 2x2
        pool3=nn.AdaptiveMaxPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5)),
        head=nn.Linear(16, 10),
    )


def _mlp() -> StageNet:
    torch.manual_seed(1)
    return StageNet(flatten=nn.Flatten(), fc1=nn.Sequential(nn.Linear(64, 32), nn.ReLU()),
                    fc2=nn.Sequential(nn.Linear(32, 32), _with_stats(nn.BatchNorm1d(32)), nn.ReLU()),
                    head=nn.Linear(32, 5))


def _handle(net: nn.Module, kind: str = "image-classifier") -> TorchHandle:
    return TorchHandle("test", net, kind, "test")


@pytest.fixture(scope="module")
def digits_cnn():
    return load_model("zoo:digits-cnn")


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("make", [_cnn, _mlp])
def test_relu_nets_are_exactly_affine_on_the_region_of_x0(make, image):
    handle = _handle(make())
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-9)):
        linear = relu.linear_map(handle, image, dtype=dtype)
        assert linear.matrix.dtype == dtype and linear.error < tol
    with torch.no_grad():  # F(x0) is the real network's output, not the frozen one's
        expected = copy.deepcopy(handle.model).double()(image[None].double()).flatten()
    assert torch.allclose(linear.output, expected, atol=1e-12)
    assert torch.allclose(linear.matrix @ image.flatten().double() + linear.bias, expected, atol=1e-9)


def test_zoo_cnn_map_and_its_parts(digits_cnn, image):
    fingerprint = digits_cnn.fingerprint
    linear = relu.linear_map(digits_cnn, image, dtype=torch.float32)
    assert linear.error < 1e-5
    linear = relu.linear_map(digits_cnn, image)
    assert linear.matrix.shape == (10, 64) and linear.output_shape == (10,) and linear.error < 1e-9
    assert [t for _, t in linear.frozen] == ["ReLU", "ReLU", "MaxPool2d", "ReLU", "MaxPool2d", "ReLU"]
    k = int(linear.output.argmax())
    assert torch.allclose(linear.votes(k).sum() + linear.bias[k], linear.output[k])
    assert torch.allclose(linear.bias_share, linear.bias / linear.output)
    s = torch.linalg.svdvals(linear.matrix)
    assert torch.allclose(linear.singular_values, s[:8])
    # singular vectors: A v_i = s_i u_i
    v = linear.input_vectors.flatten(1)
    assert torch.allclose(linear.matrix @ v.T, linear.output_vectors.T * linear.singular_values, atol=1e-10)
    assert relu.output_labels(linear)[3] == "class 3"
    assert digits_cnn.current_fingerprint() == fingerprint and count_hooks(digits_cnn.model) == 0


def test_a_column_is_the_frozen_networks_response_to_a_unit_impulse(image):
    model = gradients.working_copy(_handle(_cnn()))
    linear = relu.linear_map(model, image)
    x = image[None].double()
    with model.gates.frozen_at(x):
        zero = model.gates.differentiable_forward(torch.zeros_like(x)).flatten()
        for j in (0, 9, 27, 63):
            impulse = torch.zeros_like(x).flatten()
            impulse[j] = 1
            response = model.gates.differentiable_forward(impulse.view_as(x)).flatten() - zero
            assert torch.allclose(response.detach(), linear.matrix[:, j], atol=1e-12)
            assert torch.allclose(linear.column(j).flatten(), linear.matrix[:, j])
    assert torch.allclose(zero.detach(), linear.bias)
    assert count_hooks(model.model) == 0


def test_denoiser_rows_and_columns_are_images():
    from lib import data

    handle = load_model("zoo:digits-denoiser")
    x0 = data.default_batch(handle).images[0]
    linear = relu.linear_map(handle, x0)
    assert linear.matrix.shape == (64, 64) and linear.output_shape == (1, 8, 8) and linear.error < 1e-9
    assert linear.column(10).shape == (1, 8, 8) and linear.row(10).shape == (1, 8, 8)
    assert relu.output_labels(linear)[10] == "pixel (1, 2)"


def test_captum_input_x_gradient_sums_to_the_output_minus_the_bias(digits_cnn, image):
    linear = relu.linear_map(digits_cnn, image)
    k = int(linear.output.argmax())
    comparison = ic.image_attributions(digits_cnn, linear, k, n_steps=8)
    methods = {m.method: m for m in comparison.methods}
    assert set(methods) == {"Saliency", "InputXGradient", "IntegratedGradients", "DeepLift"}
    ixg = methods["InputXGradient"]
    assert ixg.total == pytest.approx(float(linear.output[k] - linear.bias[k]), abs=1e-9)
    assert torch.allclose(ixg.values, linear.votes(k), atol=1e-12) and ixg.correlation == pytest.approx(1.0)
    assert torch.allclose(methods["Saliency"].values, linear.row(k).abs(), atol=1e-12)
    assert comparison.exact_total == pytest.approx(ixg.total)
    # IG and DeepLift explain F(x0) - F(0), F(0) from another linear region than b
    f0 = float(digits_cnn.forward(torch.zeros(1, 1, 8, 8))[0, k])
    assert comparison.zero_input_value == pytest.approx(f0, abs=1e-4)
    assert all(-1 <= m.correlation <= 1 for m in comparison.methods)
    assert count_hooks(digits_cnn.model) == 0


def test_deeplift_sums_to_the_difference_from_the_zero_input_on_a_relu_mlp(image):
    handle = _handle(_mlp())
    linear = relu.linear_map(handle, image)
    comparison = ic.image_attributions(handle, linear, 2, n_steps=64)
    methods = {m.method: m for m in comparison.methods}
    gap = float(linear.output[2]) - comparison.zero_input_value
    assert methods["DeepLift"].total == pytest.approx(gap, abs=1e-9)  # DeepLift's summation to delta
    assert methods["IntegratedGradients"].total == pytest.approx(gap, rel=0.05)


def test_unsupported_layer_is_named():
    net = StageNet(flatten=nn.Flatten(), fc=nn.Sequential(nn.Linear(64, 8), nn.Tanh()), head=nn.Linear(8, 10))
    with pytest.raises(CapabilityError, match=r"'fc\.1' is a Tanh"):
        relu.linear_map(_handle(net), torch.rand(1, 8, 8))


def test_no_hook_survives_an_exception(image):
    model = gradients.working_copy(_handle(_cnn()))
    with pytest.raises(RuntimeError, match="boom"):
        with model.gates.frozen_at(image[None]):
            assert count_hooks(model.model) > 0
            raise RuntimeError("boom")
    assert count_hooks(model.model) == 0
    with pytest.raises(RuntimeError):  # a forward that fails inside the hooked pass
        with model.gates.frozen_at(torch.rand(1, 2, 8, 8)):
            pass
    assert count_hooks(model.model) == 0


def test_bad_inputs_are_refused(digits_cnn, tiny_lm):
    with pytest.raises(DataError, match="one float image"):
        relu.linear_map(digits_cnn, torch.rand(2, 1, 8, 8))
    with pytest.raises(DataError, match="8, 8"):
        relu.linear_map(digits_cnn, torch.rand(1, 5, 5))
    with pytest.raises(gradients.InterpreterError, match="language model"):
        relu.linear_map(tiny_lm, torch.rand(1, 8, 8))
    with pytest.raises(DataError, match="empty"):
        it.prompt_tokens(tiny_lm, "   ")
    with pytest.raises(DataError, match="two different"):
        it.logit_target(tiny_lm, 5, 5)
    with pytest.raises(DataError, match="0..256"):
        it.logit_target(tiny_lm, 300)
    with pytest.raises(DataError, match="output index"):
        ic.image_attributions(digits_cnn, relu.linear_map(digits_cnn, torch.rand(1, 8, 8)), 10)


# ------------------------------------------------------------------ transformers


@pytest.fixture(scope="module")
def biased_lm(tiny_lm):
    """A float64 private copy of the tiny GPT-2 with random biases everywhere (the random
    init leaves them zero, which would make b = 0 trivially) and MLPs scaled up so that
    their pre-activations are of order 1 (at init they are ~0.02, GELU's linear range)."""
    model = gradients.working_copy(tiny_lm)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.weights().items():
            if name.endswith(".bias"):
                tensor.add_(torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype) * 0.3)
            elif ".mlp." in name:
                tensor.mul_(20)
    model.weights_changed()
    return model


def test_detached_linearisation_reconstructs_the_logit(tiny_lm, biased_lm):
    fingerprint = tiny_lm.fingerprint
    tokens = it.prompt_tokens(tiny_lm, "def add(a, b):\n    return")
    target = it.logit_target(tiny_lm, 97, 98)
    result = it.token_contributions(tiny_lm, tokens, target)
    assert result.error < 1e-6 and result.has_positions and len(result.texts) == tokens.shape[1]
    logits = tiny_lm.forward(tokens)[0, -1].double()
    assert result.value == pytest.approx(float(logits[97] - logits[98]), abs=1e-5)
    assert tiny_lm.current_fingerprint() == fingerprint and count_hooks(tiny_lm.model) == 0
    biased = it.token_contributions(biased_lm, tokens, it.logit_target(tiny_lm, 97))
    assert abs(biased.bias) > 1e-3 and biased.error < 1e-9
    assert biased.value == pytest.approx(float(biased.contributions.sum()) + biased.bias, abs=1e-9)
    assert result.n_frozen == 3 * 2 + 1 + 3 + 3  # ln1, ln2 per block + final; patterns; MLP gates


def test_every_freeze_is_needed(biased_lm, monkeypatch):
    """Leaving one kind of nonlinearity live breaks the reconstruction: the check can fail."""
    tokens = it.prompt_tokens(biased_lm, "x = [1, 2, 3]")
    target = it.logit_target(biased_lm, 10)
    from lib.lm_capabilities import LMGates

    real = LMGates.points
    for kind in ("scale", "pattern", "gate_out"):
        def fewer(gates, kind=kind):
            points = real(gates)
            points[kind] = []
            if kind == "gate_out":
                points["gate_in"] = []
            return points
        monkeypatch.setattr(LMGates, "points", fewer)
        assert it.token_contributions(biased_lm, tokens, target).error > 1e-6, kind
    monkeypatch.undo()
    assert it.token_contributions(biased_lm, tokens, target).error < 1e-9


def test_frozen_model_ig_equals_input_x_gradient(biased_lm):
    from captum.attr import InputXGradient, IntegratedGradients

    tokens = it.prompt_tokens(biased_lm, "for i in range(3):")
    target = it.logit_target(biased_lm, 40, 41)
    result, frozen = it.linearise_lm(biased_lm, tokens, target)
    f = it.target_function(biased_lm, tokens, target, frozen)
    x = frozen.x0
    ig = IntegratedGradients(f).attribute(x, baselines=torch.zeros_like(x), n_steps=5).sum(-1)[0]
    ixg = InputXGradient(f).attribute(x).sum(-1)[0]
    assert torch.allclose(ig, ixg, atol=1e-10)
    assert torch.allclose(ixg, result.contributions, atol=1e-10)
    assert float(f(torch.zeros_like(x))) == pytest.approx(result.bias, abs=1e-10)


def test_token_attributions_beside_the_exact_contributions(tiny_lm):
    tokens = it.prompt_tokens(tiny_lm, "print('hi')")
    exact = it.token_contributions(tiny_lm, tokens, it.logit_target(tiny_lm, 41))
    comparison = ic.token_attributions(tiny_lm, exact, n_steps=4)
    assert [m.method for m in comparison.methods] == ["Saliency", "InputXGradient", "IntegratedGradients"]
    assert comparison.not_applicable[0][0] == "DeepLift"
    for m in comparison.methods:
        assert m.values.shape == exact.contributions.shape and -1 <= m.correlation <= 1
    assert comparison.exact_total == pytest.approx(exact.value - exact.bias, abs=1e-9)
    assert count_hooks(tiny_lm.model) == 0


def test_no_lm_hook_survives_an_exception(tiny_lm, monkeypatch):
    model = gradients.working_copy(tiny_lm)

    def broken(activation, pre):
        raise RuntimeError("boom")

    monkeypatch.setattr(it, "_gate", broken)  # raises inside a hook, mid-forward
    with pytest.raises(RuntimeError, match="boom"):
        it.token_contributions(model, it.prompt_tokens(tiny_lm, "abc"), it.logit_target(tiny_lm, 5))
    assert count_hooks(model.model) == 0


def test_pearson():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert ic.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert ic.pearson(a, -a) == pytest.approx(-1.0)
    assert ic.pearson(a, torch.ones(3)) != ic.pearson(a, torch.ones(3))  # nan for a constant


def test_report_sentences_state_the_numbers(digits_cnn, image):
    from analysis.interpreter import report

    linear = relu.linear_map(digits_cnn, image)
    labels = relu.output_labels(linear)
    k = int(linear.output.argmax())
    sentence = report.bias_sentence(linear, labels, k)
    assert f"{float(linear.bias[k]):+.3g}" in sentence and labels[k].capitalize() in sentence
    assert "exact up to round-off" in report.reconstruction_sentence(linear.error)
    assert "NOT exact" in report.reconstruction_sentence(1e-3)
    assert report.frozen_sentence(linear) == "Frozen at this input: 4 ReLU and 2 MaxPool2d layers."
    comparison = ic.image_attributions(digits_cnn, linear, k, n_steps=4)
    rows = report.attribution_rows(comparison)
    assert rows["method"][0].startswith("exact") and len(set(map(len, rows.values()))) == 1
    ig = next(m for m in comparison.methods if m.method == "IntegratedGradients")
    miss = ig.total - (comparison.value - comparison.zero_input_value)
    assert f"misses by {miss:+.3g}" in rows["its sum should be"][rows["method"].index("IntegratedGradients")]
    assert it.shown_token(" \n") == "␣↵" and it.shown_token("") == "∅" and it.shown_token("abcdefgh", 6) == "abcde…"
