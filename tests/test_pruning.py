"""Pruning edits: exact counts, hand-computed Wanda scores, real head and block removal
against hook references, unified layer skipping, checkpoints written back."""

import math
from fractions import Fraction

import pytest
import torch

from analysis.compress.prune.pruning import (
    Drop,
    Magnitude,
    RemoveHeads,
    SkipLayers,
    Wanda,
    dropping,
    kept_layers,
    kth_smallest,
    skip_count,
    smallest_mask,
)
from analysis.compress.recipe import Recipe, build
from lib import data
from lib.errors import RecipeError
from lib.handle import Point
from lib.hooks import count_hooks


@pytest.fixture(scope="module")
def tokens(tiny_lm):
    return data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=2).tokens


def edited(base, *edits):
    return build(base, Recipe(base.fingerprint, list(edits)))


def zeros(handle, names=None):
    return {n: int((w == 0).sum()) for n, w in handle.linear_layers().items() if names is None or n in names}


@pytest.mark.parametrize("scope, chosen", [
    ("all", lambda n: n != "unembed"),
    ("attention", lambda n: ".attn." in n),
    ("mlp", lambda n: ".mlp." in n),
])
def test_magnitude_zeroes_exactly_the_share_of_each_layer_in_scope(tiny_lm, scope, chosen):
    copy = edited(tiny_lm, Magnitude(0.4, scope))
    for name, weight in copy.linear_layers().items():
        expected = round(0.4 * weight.numel()) if chosen(name) else 0
        assert int((weight == 0).sum()) == expected, name
    name = next(n for n in copy.linear_layers() if chosen(n))
    smallest = tiny_lm.linear_layers()[name].abs().flatten().sort().values
    kept = copy.linear_layers()[name].abs()
    assert kept[kept > 0].min() >= smallest[round(0.4 * smallest.numel()) - 1]  # the smallest ones went


def test_chosen_layers_scope(tiny_lm):
    copy = edited(tiny_lm, Magnitude(0.5, "layers", (2,)))
    assert all((n.startswith("blocks.2.") and z > 0) or (not n.startswith("blocks.2.") and z == 0)
               for n, z in zeros(copy).items())


def test_global_threshold_differs_from_per_layer(tiny_lm):
    per_layer = zeros(edited(tiny_lm, Magnitude(0.5, "mlp")))
    global_ = zeros(edited(tiny_lm, Magnitude(0.5, "mlp", per="global")))
    total = sum(w.numel() for n, w in tiny_lm.linear_layers().items() if ".mlp." in n)
    assert sum(global_.values()) == round(0.5 * total) and global_ != per_layer
    weights = {n: w.abs() for n, w in tiny_lm.linear_layers().items() if ".mlp." in n}
    threshold = torch.cat([w.flatten() for w in weights.values()]).sort().values[round(0.5 * total) - 1]
    for name, w in weights.items():  # one threshold: each layer loses exactly its weights below it
        assert global_[name] == int((w <= threshold).sum())


@pytest.mark.parametrize("values", [
    torch.randn(1_000_003).abs(),  # large enough for the sampled bracket
    torch.cat([torch.zeros(600_000), torch.rand(400_000)]),  # an already half-pruned layer: a tie at 0
    torch.randint(0, 5, (700_000,)).float(),  # a handful of distinct values: ties everywhere
])
def test_kth_smallest_is_exact_and_the_mask_holds_exactly_k(values):
    for k in (1, 17, values.numel() // 3, values.numel() // 2, values.numel() - 1):
        assert kth_smallest(values, k) == values.kthvalue(k).values
        mask = smallest_mask(values, k)
        assert int(mask.sum()) == k
        assert values[mask].max() <= values[~mask].min()


def test_wanda_scores_match_a_hand_computation():
    """One linear layer W [2, 3] fed X [2 positions, 3]: ||X_j|| = (5, 1, 10), so the scores
    |W| * ||X_j|| are [[5, 4, 2], [2.5, 3, 10]]; at 1/3 per row, row 0 loses its 0.2, row 1 its 0.5."""
    from analysis.compress.prune import pruning
    from lib.image_handle import TorchHandle

    class OneLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = torch.nn.ModuleDict({"head": torch.nn.Linear(3, 2, bias=False)})

        def forward(self, x):
            return self.stages["head"](x)

    net = OneLayer()
    with torch.no_grad():
        net.stages["head"].weight.copy_(torch.tensor([[1.0, 4.0, 0.2], [0.5, -3.0, 1.0]]))
    handle = TorchHandle("one layer", net, "image-classifier", "one layer")
    x = torch.tensor([[3.0, 1.0, 6.0], [4.0, 0.0, 8.0]])
    norms = handle.input_norms(x, ["head"])["head"]
    assert torch.allclose(norms, torch.tensor([5.0, 1.0, 10.0]))
    weight = handle.private_copy().linear_layers()["head"]
    score = weight.abs() * norms[None, :]
    assert torch.allclose(score, torch.tensor([[5.0, 4.0, 2.0], [2.5, 3.0, 10.0]]))
    pruning._zero_smallest_rowwise_(weight, score, 1)
    assert torch.equal(weight, torch.tensor([[1.0, 4.0, 0.0], [0.0, -3.0, 1.0]]))


def test_wanda_on_a_convolution_uses_im2col_columns(tmp_path):
    from lib.models import load_model, save_image_model
    from lib.zoo.nets import DigitsCNN

    torch.manual_seed(0)
    save_image_model(DigitsCNN(width=4), "digits-cnn", tmp_path, width=4)
    base = load_model(str(tmp_path))
    images = data.default_batch(base).images
    norms = base.input_norms(images, ["conv1"])["conv1"]  # [1 * 3 * 3]: one per kernel position
    patches = torch.nn.functional.unfold(images, 3, padding=1)  # [n, 9, 64]
    assert torch.allclose(norms, patches.pow(2).sum((0, 2)).sqrt(), rtol=1e-5)
    copy = edited(base, Wanda(0.5, "layers", ("conv1",)))
    assert int((copy.linear_layers()["conv1"] == 0).sum()) == 4 * round(0.5 * 9)


def test_removed_heads_equal_zeroing_their_outputs(tiny_lm, tokens):
    copy = edited(tiny_lm, RemoveHeads(1, (0, 2)))

    def zero_heads(z):  # [batch, pos, head, d_head]
        z = z.clone()
        z[:, :, [0, 2]] = 0
        return z

    with tiny_lm.hooks([(Point("z", 1), zero_heads)]):
        reference = tiny_lm.forward(tokens)
    torch.testing.assert_close(copy.forward(tokens), reference, rtol=1e-5, atol=1e-5)
    assert copy.linear_layers()["blocks.1.attn.qkv"].shape == (3 * 16, 32)  # 2 of 4 heads of 8 dims left
    assert copy.linear_layers()["blocks.1.attn.o"].shape == (32, 16)
    assert copy.heads.left(1) == [1, 3] and tiny_lm.heads.left(1) == [0, 1, 2, 3]
    assert tiny_lm.n_params - copy.n_params == 2 * 8 * (32 * 3 + 3) + 2 * 8 * 32
    assert ("removed", "heads 0, 2 of layer 1") in copy.describe()
    again = edited(tiny_lm, RemoveHeads(1, (0, 2)), RemoveHeads(1, (3,)))  # original indices, not positions
    assert again.heads.left(1) == [1]


@pytest.mark.parametrize("drop", [Drop("block", 1), Drop("attention", 0), Drop("mlp", 2)])
def test_removed_parts_equal_the_redundancy_views_drop_hooks(tiny_lm, tokens, drop):
    copy = edited(tiny_lm, drop)
    with dropping(tiny_lm, [drop]):
        reference = tiny_lm.forward(tokens)
    torch.testing.assert_close(copy.forward(tokens), reference, rtol=1e-5, atol=1e-5)
    assert count_hooks(tiny_lm.model) == 0 and count_hooks(copy.model) == 0
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint


def test_unified_layer_skipping_keeps_a_balanced_spread():
    """METHODS §4's examples: K = round(L / r), kept_i = ceil(i (L-1) / (K-1))."""
    assert kept_layers(30, 5) == [0, 6, 12, 18, 24, 29]
    assert kept_layers(12, 2) == [0, 3, 5, 7, 9, 11]
    assert kept_layers(24, 4) == [0, 5, 10, 14, 19, 23]
    assert kept_layers(6, 2) == [0, 3, 5]
    assert kept_layers(12, 3) == [0, 4, 8, 11]
    assert kept_layers(12, 7) == [0, 11]  # round(12 / 7) = 2
    assert kept_layers(32, 1.5) == [0, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16, 18, 19, 21, 22, 24, 25, 27, 28, 30, 31]
    with pytest.raises(RecipeError, match=r"fewer than 2 of 12 layers \(round\(12 / 9\) = 1\); the most .* is 8\."):
        kept_layers(12, 9)
    with pytest.raises(RecipeError, match="keep 24 of 12 layers"):
        kept_layers(12, 0.5)
    for bad in (0, -2, float("inf"), float("nan"), True):
        with pytest.raises(RecipeError, match="finite number > 0"):
            kept_layers(12, bad)


def _speedups(n_layers):
    """Every r = 1.0, 1.1, ... up to L / 1.5 (K >= 2) twice: written as a decimal, and as the
    float a slider's running sum gives (1.2000000000000002 and the like)."""
    summed = 1.0
    for tenths in range(10, int(10 * n_layers / 1.5) + 1):
        yield Fraction(tenths, 10), float(Fraction(tenths, 10)), summed
        summed += 0.1


@pytest.mark.parametrize("n_layers", range(2, 49))
def test_layer_skipping_is_balanced_for_every_depth_and_speed_up(n_layers):
    for exact, written, summed in _speedups(n_layers):
        k = math.floor(n_layers / exact + Fraction(1, 2))  # round half up, exactly
        kept = kept_layers(n_layers, written)
        assert skip_count(n_layers, written) == skip_count(n_layers, summed) == k == len(kept), (written, summed)
        assert kept_layers(n_layers, summed) == kept
        assert kept == [math.ceil(Fraction(i * (n_layers - 1), k - 1)) for i in range(k)]
        assert kept[0] == 0 and kept[-1] == n_layers - 1
        gaps = [b - a for a, b in zip(kept, kept[1:])]
        assert min(gaps) >= 1 and max(gaps) - min(gaps) <= 1, (written, kept)
        # the L - K skipped layers in K - 1 gaps: no run longer than that forces, at the top or anywhere
        assert max(gaps) - 1 == -(-(n_layers - k) // (k - 1)), (written, kept)


def test_float_spellings_of_one_speed_up_keep_the_same_layers():
    assert kept_layers(6, 1.2) == kept_layers(6, 1.2000000000000002) == [0, 2, 3, 4, 5]
    assert skip_count(3, 1.2) == skip_count(3, 1.2000000000000002) == 3  # 3 / 1.2 = 2.5, rounded half up
    assert skip_count(30, 4) == skip_count(30, 4.000000000000001) == 8  # 7.5 -> 8 either way


def test_layer_skipping_removes_the_other_blocks(tiny_lm, tmp_path):
    from lib.models import load_model

    from conftest import save_tiny_gpt2

    save_tiny_gpt2(tmp_path, n_layer=6)
    six = load_model(str(tmp_path))
    copy = edited(six, SkipLayers(2.0))
    assert set(copy.structure.removed) == {"block 1", "block 2", "block 4"}
    assert set(edited(tiny_lm, SkipLayers(2.0)).structure.removed) == {"block 1"}  # round(3 / 2) = 2
    with pytest.raises(RecipeError, match="most this model allows is 2"):
        edited(tiny_lm, SkipLayers(2.5))


@pytest.mark.parametrize("edit, message", [
    (lambda: Magnitude(1.0), r"fraction in \[0, 1\)"),
    (lambda: Magnitude(-0.1), r"fraction in \[0, 1\)"),
    (lambda: Wanda(0.5, "heads"), "scope is one of"),
    (lambda: Magnitude(0.5, "layers"), "at least one layer"),
    (lambda: RemoveHeads(1, (1, 1)), "distinct head indices"),
    (lambda: SkipLayers(1), "number > 1"),
])
def test_bad_edits_are_refused(edit, message):
    with pytest.raises(RecipeError, match=message):
        edit()


def test_edits_that_do_not_fit_the_model_are_refused(tiny_lm):
    with pytest.raises(RecipeError, match=r"no head\(s\) \[7\]"):
        edited(tiny_lm, RemoveHeads(1, (7,)))
    with pytest.raises(RecipeError, match="already removed"):
        edited(tiny_lm, Drop("block", 1), Drop("attention", 1))
    for first in (Drop("block", 1), Drop("attention", 1), RemoveHeads(1, (0, 1, 2, 3))):
        with pytest.raises(RecipeError, match="already removed"):
            edited(tiny_lm, first, RemoveHeads(1, (0,)))
    with pytest.raises(RecipeError, match=r"no layer 9; it has blocks 0\.\.2"):
        edited(tiny_lm, Magnitude(0.5, "layers", (9,)))


def test_checkpoint_of_an_edited_copy_loads_back_the_same(tiny_lm, tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    from lib.models import load_model

    copy = edited(tiny_lm, Magnitude(0.3), RemoveHeads(0, (1,)), Drop("mlp", 2), Drop("block", 1))
    copy.save_pretrained(tmp_path)
    back = load_model(str(tmp_path))
    torch.testing.assert_close(back.forward(tokens), copy.forward(tokens), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path))(tokens).logits
    torch.testing.assert_close(plain, copy.forward(tokens), rtol=1e-5, atol=1e-5)


def test_image_model_prunes_and_exports(tmp_path):
    from lib.models import load_model, save_image_model
    from lib.zoo.nets import DigitsCNN

    torch.manual_seed(0)
    save_image_model(DigitsCNN(width=4), "digits-cnn", tmp_path / "base", width=4)
    base = load_model(str(tmp_path / "base"))
    copy = edited(base, Drop("stage", "conv2"), Wanda(0.5), Magnitude(0.2, "layers", ("fc1",)))
    assert "conv2" not in copy.linear_layers()
    head = copy.linear_layers()["head"]
    assert int((head == 0).sum()) == 10 * 32  # Wanda: half of each row's 64 inputs
    copy.save_pretrained(tmp_path / "edited")
    back = load_model(str(tmp_path / "edited"))
    images = data.digits_batch(n=8).images
    assert torch.equal(back.forward(images), copy.forward(images))
    assert dict(back.structure.stages)["conv2"] == "removed (identity)"
