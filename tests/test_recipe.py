"""Recipes: tagged edits, JSON round trip, registry dispatch, edited copies of the base."""

import json
import re
from dataclasses import dataclass

import pytest
import torch

from analysis.compress.edits import Edit, apply_, edit_type, from_dict
from analysis.compress.prune.pruning import Drop, dropping
from analysis.compress.recipe import Recipe, build
from lib import data
from lib.errors import RecipeError
from lib.hooks import count_hooks


@pytest.fixture(scope="module")
def tokens(tiny_lm):
    return data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=2).tokens


@pytest.mark.parametrize("kind, layer, message", [
    ("head", 0, "kind is one of"),
    ("block", -1, "layer index >= 0"),
    ("block", True, "layer index >= 0"),
    ("mlp", "3", "layer index >= 0"),
    ("stage", 2, "names the stage"),
])
def test_drop_validates_its_fields(kind, layer, message):
    with pytest.raises(RecipeError, match=message):
        Drop(kind, layer)


def test_json_round_trip_keeps_edits_order_and_digest(tiny_lm):
    recipe = Recipe(tiny_lm.fingerprint, [Drop("mlp", 2), Drop("attention", 0)], model="tiny")
    again = Recipe.from_json(recipe.to_json())
    assert again == recipe and again.digest == recipe.digest and again.key == recipe.key
    assert json.loads(recipe.to_json())["edits"][0] == {"type": "drop", "kind": "mlp", "layer": 2}
    reordered = Recipe(tiny_lm.fingerprint, [Drop("attention", 0), Drop("mlp", 2)])
    assert reordered.digest != recipe.digest  # order matters: edits apply in order
    assert Recipe(tiny_lm.fingerprint).key == tiny_lm.fingerprint


@pytest.mark.parametrize("edits, message", [
    ([{"type": "prune_heads", "heads": [1]}], "Unknown edit type 'prune_heads'"),
    ([{"type": "drop", "kind": "mlp", "layer": 1, "scale": 2}], "no field.*scale"),
    ([{"type": "drop", "kind": "mlp"}], "needs the field.*layer"),
    ([{"type": "drop", "kind": "mlp", "layer": "x"}], "layer index"),
    ([["drop", "mlp", 1]], "must be a JSON object"),
])
def test_bad_edits_are_refused_by_name(tiny_lm, edits, message):
    text = json.dumps({"fingerprint": tiny_lm.fingerprint, "edits": edits})
    with pytest.raises(RecipeError, match=message):
        Recipe.from_json(text)


def test_bad_recipe_files_are_refused(tiny_lm):
    with pytest.raises(RecipeError, match="not valid JSON"):
        Recipe.from_json("{edits: [")
    with pytest.raises(RecipeError, match="no field.*author"):
        Recipe.from_json(json.dumps({"fingerprint": "x", "edits": [], "author": "me"}))
    with pytest.raises(RecipeError, match="format"):
        Recipe.from_json(json.dumps({"format": "other/9", "fingerprint": "x", "edits": []}))
    with pytest.raises(RecipeError, match="made for another model"):
        build(tiny_lm, Recipe("0123456789abcdef", [Drop("block", 0)], model="gpt2"))


HUGE = "x" * 300_000


@pytest.mark.parametrize("text, message", [
    (json.dumps({"fingerprint": "x", "edits": [{"type": "drop", "kind": "block", "layer": 0}] * 201}),
     "lists 201 edits; LayerScope applies at most 200"),
    (json.dumps({"fingerprint": "x", "edits": [], "pad": HUGE}), "The recipe file is 293 KiB"),
    ("[" * 20_000 + "]" * 20_000, "nests lists or objects too deeply"),
    (json.dumps({"fingerprint": "x", "edits": [{"type": ["drop"]}]}), "Unknown edit type ['drop']"),
    (json.dumps({"fingerprint": "x", "edits": [{"type": "drop", "kind": HUGE[:100_000], "layer": 0}]}),
     "kind is one of"),
    (json.dumps({"fingerprint": "x", "edits": [{"type": "drop", "kind": "block", "layer": 0, HUGE[:9_000]: 1}]}),
     "no field"),
])
def test_a_hostile_recipe_is_refused_in_a_short_message(text, message):
    with pytest.raises(RecipeError, match=re.escape(message)) as refused:
        Recipe.from_json(text)
    assert len(str(refused.value)) < 500  # never the megabyte field echoed back


def test_apply_dispatches_through_the_registry(tiny_lm):
    @edit_type("test-only-scale")
    @dataclass(frozen=True)
    class Unapplied(Edit):
        factor: float = 2.0

    copy = tiny_lm.private_copy()
    with pytest.raises(RecipeError, match="no way to apply a Unapplied"):
        apply_(copy, Unapplied())
    assert from_dict({"type": "test-only-scale", "factor": 3.0}) == Unapplied(3.0)
    with pytest.raises(RecipeError, match="private copy"):
        apply_(tiny_lm, Drop("block", 0))  # never on the loaded base model
    with pytest.raises(RecipeError, match="not a part of this 3-layer model"):
        apply_(copy, Drop("block", 5))


@pytest.mark.parametrize("drops", [[Drop("block", 1)], [Drop("attention", 0), Drop("mlp", 2)]])
def test_built_model_equals_the_drop_hooks_and_leaves_the_base_alone(tiny_lm, tokens, drops):
    base_print, base_out = tiny_lm.current_fingerprint(), tiny_lm.forward(tokens)
    edited = build(tiny_lm, Recipe(tiny_lm.fingerprint, drops))
    with dropping(tiny_lm, drops):
        hooked = tiny_lm.forward(tokens)
    assert torch.allclose(edited.forward(tokens), hooked, atol=1e-6)
    assert not torch.allclose(hooked, base_out)
    assert edited.fingerprint != tiny_lm.fingerprint and edited.base_fingerprint == tiny_lm.fingerprint
    assert tiny_lm.current_fingerprint() == base_print and torch.equal(tiny_lm.forward(tokens), base_out)
    assert count_hooks(tiny_lm.model) == 0 and count_hooks(edited.model) == 0


def test_image_stage_drop_really_removes_the_stage(tmp_path):
    from lib.models import load_model, save_image_model
    from lib.zoo.nets import DigitsCNN

    torch.manual_seed(0)
    save_image_model(DigitsCNN(width=4), "digits-cnn", tmp_path, width=4)
    base = load_model(str(tmp_path))
    images = data.digits_batch(n=16).images
    edited = build(base, Recipe(base.fingerprint, [Drop("stage", "conv2")]))
    with dropping(base, [Drop("stage", "conv2")]):
        hooked = base.forward(images)
    assert torch.equal(edited.forward(images), hooked)
    assert isinstance(edited.model.stages["conv2"], torch.nn.Identity)
    assert not isinstance(base.model.stages["conv2"], torch.nn.Identity)
    with pytest.raises(RecipeError, match="cannot be bypassed"):
        build(base, Recipe(base.fingerprint, [Drop("stage", "pool1")]))


def test_recipe_list_operations(tiny_lm):
    recipe = Recipe(tiny_lm.fingerprint)
    assert recipe.add(Drop("block", 1)) and not recipe.add(Drop("block", 1))
    recipe.add(Drop("mlp", 0))
    recipe.move(1, 0)
    assert recipe.edits == [Drop("mlp", 0), Drop("block", 1)]
    assert recipe.remove(0) == Drop("mlp", 0)
    with pytest.raises(RecipeError, match="no edit number 5"):
        recipe.remove(4)
    assert recipe.undo() == Drop("block", 1) and recipe.undo() is None and recipe.digest == ""


def _one_of_each_edit():
    """An instance of every registered edit type, with tuples where JSON writes lists."""
    from analysis.compress.exits.rule import EarlyExit
    from analysis.compress.prune.allocation import LayerSparsity
    from analysis.compress.prune.factorize import LowRank, ShareLayers
    from analysis.compress.prune.pruning import Magnitude, RemoveHeads, SkipLayers, Wanda
    from analysis.compress.quant.quantize import LLMInt8, Quantize

    return [Drop("block", 1), EarlyExit("max_prob", 0.83, "logit"),
            LayerSparsity((("blocks.0.mlp.in", 0.25), ("blocks.1.attn.o", 0.5))), LLMInt8(6.0, "layers", (0, 1)),
            LowRank(rank=4, scope="mlp"), Magnitude(0.3, scope="layers", layers=(0, 2)),
            Quantize("int4", group_size=16),
            RemoveHeads(2, (0, 3)), ShareLayers(0, 1, 2), SkipLayers(1.5), Wanda(0.5)]


def test_every_edit_type_the_lab_saves_loads_back(tiny_lm):
    from analysis.compress import edits

    examples = _one_of_each_edit()
    shipped = {cls for cls in edits.EDIT_TYPES.values() if cls.__module__.startswith("analysis.")}  # not tests' own
    assert {type(e) for e in examples} == shipped  # a new edit type needs an example here
    recipe = Recipe(tiny_lm.fingerprint, examples, model="tiny")
    again = Recipe.from_json(recipe.to_json())
    assert again.edits == recipe.edits and again.digest == recipe.digest
