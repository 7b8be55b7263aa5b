"""Inputs that used to give a plausible but wrong answer are refused in words: arguments out
of range, non-finite weights or settings, NaN or inf outputs. The base model stays
bit-identical after each (the `base` fixture checks)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from analysis.channels import heads
from analysis.compress import edits as edit_registry
from analysis.compress import exits
from analysis.compress.edits import apply_
from analysis.compress.lab import Lab
from analysis.compress.prune.allocation import LayerSparsity
from analysis.compress.prune.factorize import LowRank
from analysis.compress.prune.pruning import Magnitude, Wanda
from analysis.compress.quant.mixed_precision import allocate, sensitivity
from analysis.compress.quant.quantize import LLMInt8, Quantize
from analysis.interpreter import relu
from analysis.redundancy.cka import cka_matrix
from lib import data
from lib.errors import AnalysisError, DataError, LayerScopeError, NoCheckpointError, RecipeError
from lib.metrics import metrics_from_outputs
from lib.models import load_model
from lib.scoring import kl_and_agreement, prepare_base, text_scores
from lib.zoo import ZOO_DIR


@pytest.fixture(scope="module")
def batch(tiny_lm):
    return data.code_batch(tiny_lm.tokenizer, seq_len=32, n_windows=4)


@pytest.fixture(scope="module")
def cnn():
    return load_model("zoo:digits-cnn")


# ------------------------------------------------------------------ arguments out of range


@pytest.mark.parametrize("edit", [
    Magnitude(0.5, scope="layers", layers=(0, 99)),
    Wanda(0.5, scope="layers", layers=(3,)),
    Quantize("int8", scope="layers", layers=(1, 7)),
    LLMInt8(scope="layers", layers=(5,)),
    LowRank(rank=2, scope="layers", layers=(0, 42)),
])
def test_an_edit_naming_a_block_the_model_lacks_is_refused(base, batch, edit):
    copy = base.private_copy()
    with pytest.raises(RecipeError, match=r"has blocks 0\.\.2\. Pick layers"):
        apply_(copy, edit)


def test_an_edit_naming_a_stage_the_image_model_lacks_is_refused(cnn):
    copy = cnn.private_copy()
    with pytest.raises(RecipeError, match="has no layer conv9; it has layers .*conv1"):
        apply_(copy, Quantize("int8", scope="layers", layers=("conv9",)))
    assert cnn.current_fingerprint() == cnn.fingerprint


def test_low_rank_checks_its_scope_and_layers_like_the_other_edits():
    with pytest.raises(RecipeError, match="lists layers only with scope 'layers'"):
        LowRank(rank=2, scope="mlp", layers=(0,))
    with pytest.raises(RecipeError, match="needs at least one layer"):
        LowRank(rank=2, scope="layers")


def test_edits_inside_the_model_still_apply(base):
    copy = base.private_copy()
    apply_(copy, Magnitude(0.5, scope="layers", layers=(0, 2)))
    changed = [name for name, w in copy.linear_layers().items() if not torch.equal(w, base.linear_layers()[name])]
    assert changed and {copy.place(name)[0] for name in changed} == {0, 2}


@pytest.mark.parametrize("layer", [-1, 3, 99])
def test_run_block_refuses_a_block_the_model_lacks(base, layer):
    with pytest.raises(AnalysisError, match=rf"no block {layer} to run: this model has blocks 0\.\.2"):
        base.blocks.run(layer, torch.zeros(1, 3, 32))


@pytest.mark.parametrize("limit", [0, -3])
def test_prompt_tokens_refuses_a_limit_below_one(base, limit):
    with pytest.raises(AnalysisError, match=rf"token limit is a whole number >= 1, not {limit}"):
        heads.prompt_tokens(base, "def f(x): return x", max_tokens=limit)
    assert heads.prompt_tokens(base, "def f", max_tokens=3).ids.shape == (1, 3)


def test_linear_map_refuses_a_negative_number_of_singular_directions(cnn):
    image = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AnalysisError, match="singular directions to keep is a whole number >= 0, not -1"):
        relu.linear_map(cnn, image, n_singular=-1)
    assert relu.linear_map(cnn, image, n_singular=0).singular_values.numel() == 0
    assert cnn.current_fingerprint() == cnn.fingerprint


@pytest.mark.parametrize("criterion, thresholds, message", [
    ("max_prob", [float("nan"), 2.0], "include nan; every exit threshold must be a finite number"),
    ("entropy", torch.tensor([0.5, float("inf")]), "include inf"),
    ("max_prob", [0.5, 2.0], r"max_prob thresholds are in \[0, 1\] on this model; 2 is outside"),
    ("saturation", [-1.5], r"in \[-1, 1\]"),
    ("entropy", [-0.1], "in \\[0, inf\\]"),
    ("patience", [1.5], r"whole numbers 0\.\.2"),
    ("patience", [3], r"whole numbers 0\.\.2 on this model; 3 is outside"),
    ("max_prob", [], "non-empty list of numbers"),
    ("max_prob", [[0.5]], "non-empty list of numbers"),
])
def test_exit_curve_refuses_thresholds_that_are_not_finite_or_out_of_range(base, batch, criterion, thresholds,
                                                                           message):
    stats = exits.collect_exit_stats(base, batch)
    assert len(stats.depths) == 2  # patience counts 0..2 checks
    with pytest.raises(AnalysisError, match=message):
        exits.exit_curve(stats, criterion, thresholds)
    assert exits.exit_curve(stats, criterion, torch.tensor([0.0, 1.0])).agreement.shape == (2,)


def test_a_per_layer_sparsity_naming_a_layer_twice_is_refused(base):
    name = next(iter(base.linear_layers()))
    with pytest.raises(RecipeError, match=f"names each layer once; {name} appear"):
        LayerSparsity(((name, 0.2), ("other", 0.1), (name, 0.8)))
    with pytest.raises(RecipeError, match="names each layer once"):
        edit_registry.from_dict({"type": "layer_sparsity", "sparsities": [[name, 0.2], [name, 0.2]]})


def test_mixed_precision_refuses_a_high_format_narrower_than_the_low_one(base, batch):
    sens = sensitivity(base, batch, "int4")
    with pytest.raises(RecipeError, match=r"format int4 \(4 bits\) is narrower than the others' int8 \(8 bits\)"):
        allocate(base, batch, sens, low="int8", high="int4", budget_bits=base.size_bits)
    assert allocate(base, batch, sens, low="int4", high="int8", budget_bits=base.size_bits).met


# ------------------------------------------------------------------ non-finite weights and settings


def _poison(folder, name: str, index: tuple, value: float) -> None:
    from safetensors.torch import load_file, save_file

    file = next(folder.glob("*.safetensors"))
    state = load_file(file)
    state[name][index] = value
    save_file(state, file, metadata={"format": "pt"})


@pytest.mark.parametrize("name, index, value", [
    ("transformer.wte.weight", (5, 3), float("nan")),
    ("transformer.h.1.mlp.c_fc.weight", (0, 0), float("inf")),
])
def test_a_language_model_with_a_non_finite_weight_is_refused_at_load(lm, name, index, value):
    _poison(lm, name, index, value)
    with pytest.raises(NoCheckpointError, match=rf"the weight {name} holds NaN or infinite values"):
        load_model(str(lm))


def test_an_image_model_with_a_nan_weight_is_refused_at_load(tmp_path, cnn):
    folder = tmp_path / "cnn"
    shutil.copytree(ZOO_DIR / cnn.spec.removeprefix("zoo:"), folder)
    name = next(n for n, t in cnn.model.state_dict().items() if t.is_floating_point())
    _poison(folder, name, (0,), float("nan"))
    with pytest.raises(NoCheckpointError, match=rf"the weight {name} holds NaN"):
        load_model(str(folder))


@pytest.mark.parametrize("value", [-1e-5, float("nan"), "small"])
def test_a_bad_layer_norm_epsilon_is_refused_at_load(lm, value):
    config = json.loads((lm / "config.json").read_text())
    config["layer_norm_epsilon"] = value
    (lm / "config.json").write_text(json.dumps(config))
    with pytest.raises(NoCheckpointError, match="config.json sets layer_norm_epsilon to .*finite number >= 0"):
        load_model(str(lm))


# ------------------------------------------------------------------ non-finite outputs


def _spoiled(outputs: torch.Tensor, value: float) -> torch.Tensor:
    bad = outputs.clone()
    bad.view(-1)[7] = value
    return bad


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_metrics_refuse_non_finite_language_model_outputs(base, batch, value):
    outputs = base.forward(batch.tokens)
    message = "model produced NaN or infinite outputs on this batch"
    with pytest.raises(DataError, match=message):
        metrics_from_outputs(_spoiled(outputs, value), batch, base.n_params, base.size_bits, outputs)
    if value == -float("inf"):  # one token ruled out, not the target: still a distribution, the NLL holds
        assert math.isfinite(text_scores(_spoiled(outputs, value), batch)[0])
    else:
        with pytest.raises(DataError, match=message):
            text_scores(_spoiled(outputs, value), batch)
    with pytest.raises(DataError, match="The base model produced NaN"):
        prepare_base(_spoiled(outputs, value), batch)
    assert math.isfinite(metrics_from_outputs(outputs, batch, base.n_params, base.size_bits, outputs).nll)


def test_metrics_refuse_non_finite_classifier_outputs(cnn):
    batch = data.default_batch(cnn)
    outputs = cnn.forward(batch.images)
    with pytest.raises(DataError, match="model produced NaN or infinite outputs"):
        metrics_from_outputs(_spoiled(outputs, float("nan")), batch, cnn.n_params, cnn.size_bits)
    with pytest.raises(DataError, match="model produced NaN or infinite outputs"):
        kl_and_agreement(_spoiled(outputs, float("nan")), outputs, batch)
    with pytest.raises(DataError, match="base model produced NaN"):
        kl_and_agreement(outputs, _spoiled(outputs, float("inf")), batch)


@pytest.fixture
def nan_magnitude(monkeypatch):
    """Magnitude pruning that writes a NaN into the copy's first weight (as a broken edit might)."""

    def poison(handle, edit):
        with torch.no_grad():
            weight = next(iter(handle.linear_layers().values()))
            weight[(0,) * weight.dim()] = float("nan")

    monkeypatch.setitem(edit_registry._APPLY, Magnitude, poison)


def test_an_edit_that_makes_nan_outputs_leaves_the_lab_recipe_as_it_was(base, batch, nan_magnitude):
    lab = Lab(base, batch, latency_repeats=0)
    lab.add(Wanda(0.2))
    before = lab.recipe.edits
    with pytest.raises(DataError, match="model produced NaN or infinite outputs on this batch"):
        lab.add(Magnitude(0.3))
    assert lab.recipe.edits == before and len(lab.history) == 2


def test_the_lab_page_shows_the_nan_refusal_as_a_message(base, batch, nan_magnitude, monkeypatch):
    from ui import session

    shown: list[str] = []
    monkeypatch.setattr(session.st, "error", lambda text, *a, **k: shown.append(text))
    lab = Lab(base, batch, latency_repeats=0)
    assert session.change_recipe("adding", lambda progress: lab.add(Magnitude(0.3), progress)) is False
    assert len(shown) == 1 and "produced NaN or infinite outputs on this batch" in shown[0]
    assert lab.recipe.edits == [] and len(lab.history) == 1
    assert issubclass(DataError, LayerScopeError)


def test_cka_refuses_a_representation_with_nan():
    reps = [torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    reps[1][2, 1] = float("nan")
    with pytest.raises(AnalysisError, match="Representation 1 holds NaN or infinite values"):
        cka_matrix(reps)
    with pytest.raises(AnalysisError, match="Representation 1 holds NaN"):
        cka_matrix(reps, exact_max=4)  # the minibatch estimator too
