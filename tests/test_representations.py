"""Representations: code labels against hand-written answers, probes on planted and random
features, the file split, the control task, and the depth-linearity fit on synthetic
weights (checked against the lab's own shared-blocks edit)."""

import numpy as np
import pytest
import torch

from analysis.representations.code_labels import TOKEN_KINDS, label_source
from analysis.representations.dataset import probe_text, token_characters
from analysis.representations.depth import _share_residual, chance_residual, depth_fit, linear_fit
from analysis.representations.probes import control_labels, probe_features, probe_layers, split_windows
from lib.errors import CapabilityError

SNIPPET = 'def f(x):\n    # note\n    return [x, "a(b"]\n'
# Hand-written labels: character index -> (kind, bracket depth, in string/comment, indent, AST node);
# None = unlabelled. Lines start at 0, 10 and 21.
EXPECTED = {
    0: ("keyword", 0, 0, 0, "FunctionDef"),  # d of def
    3: (None, 0, 0, 0, "FunctionDef"),  # the space after def: no token
    4: ("name", 0, 0, 0, "FunctionDef"),  # f
    5: ("operator", 0, 0, 0, "FunctionDef"),  # ( sits outside itself
    6: ("name", 1, 0, 0, "arg"),  # x, the parameter
    7: ("operator", 0, 0, 0, "FunctionDef"),  # )
    14: ("comment", 0, 1, None, "FunctionDef"),  # # of the comment line: tokenize gives it no indent
    25: ("keyword", 0, 0, 1, "Return"),  # r of return
    32: ("operator", 0, 0, 1, "List"),  # [
    33: ("name", 1, 0, 1, "Name"),  # x in the list
    34: ("operator", 1, 0, 1, "List"),  # ,
    36: ("string", 1, 1, 1, "Constant"),  # opening quote
    38: ("string", 1, 1, 1, "Constant"),  # ( inside the string: not a bracket
    41: ("operator", 0, 0, 1, "List"),  # ]
}


def labels_at(labels, i):
    kind = int(labels.token_kind[i])
    indent = int(labels.indent_level[i])
    return (TOKEN_KINDS[kind] if kind >= 0 else None, int(labels.bracket_depth[i]),
            int(labels.in_string_or_comment[i]), indent if indent >= 0 else None, labels.ast_name_at(i))


def test_snippet_labels_match_hand_written_answers():
    labels = label_source(SNIPPET)
    assert SNIPPET[38] == "(" and SNIPPET[14] == "#" and SNIPPET[25] == "r" and SNIPPET[41] == "]"  # indices right
    for i, expected in EXPECTED.items():
        assert labels_at(labels, i) == expected, (i, SNIPPET[i])
    assert labels.n_chunks == 1 and labels.failed_chunks == 0


def test_deep_brackets_indents_and_non_ascii_columns():
    source = 's = "é"\nif a:\n    if b:\n        y = f(g([{1}]))\n'
    labels = label_source(source)
    one = source.index("1")
    assert labels_at(labels, one) == ("number", 3, 0, 2, "Constant")  # depth 4 capped at 3+
    assert labels.ast_name_at(source.index("é")) == "Constant"  # ast's byte columns read as characters
    assert labels.ast_name_at(0) == "Name"


def test_text_that_does_not_parse_is_labelled_chunk_by_chunk():
    good = "def a():\n    return 1\n"
    bad = "def b(:\n    pass\n"
    source = good + "\n" + bad + "\n" + good.replace("a", "c")
    labels = label_source(source)
    assert labels.n_chunks == 3 and labels.failed_chunks == 1
    start_bad, start_last = source.index("def b"), source.index("def c")
    assert (labels.ast_node[start_bad:start_last - 1] == -1).all()  # the broken chunk stays unlabelled
    assert labels.ast_name_at(start_last) == "FunctionDef" and labels.ast_name_at(0) == "FunctionDef"
    assert labels_at(labels, start_last + source[start_last:].index("1"))[0] == "number"


def test_probe_text_is_the_evaluation_batch_and_its_labels_sit_on_the_right_bytes(tiny_lm):
    from lib.data import code_batch

    text = probe_text(tiny_lm, n_windows=4, seq_len=64)
    assert torch.equal(text.tokens, code_batch(tiny_lm.tokenizer, seq_len=64, n_windows=4).tokens)
    assert (text.labels["token_kind"][:, 0] == -1).all()  # BOS is never labelled
    kinds = text.labels["token_kind"]
    for byte, kind in ((ord("("), "operator"), (ord("0"), None)):
        at = (text.tokens == byte) & (kinds >= 0)
        if kind is not None and at.any():
            found = {TOKEN_KINDS[k] for k in kinds[at].tolist()}
            assert found <= {"operator", "string", "comment"}  # a "(" is an operator unless quoted
    assert 0 < text.n_labelled("token_kind") < text.n_positions
    assert text.n_labelled("bracket_depth") > text.n_labelled("token_kind")  # whitespace has a depth, no kind


def test_a_tokenizer_without_offsets_is_refused():
    class WordTokenizer:
        bos_token_id = None

        def encode(self, text, add_special_tokens=False):
            return [len(w) for w in text.split()]

        def __call__(self, text, **kwargs):
            raise NotImplementedError("slow tokenizer")

    with pytest.raises(CapabilityError, match="offsets"):
        token_characters(WordTokenizer(), "def f(x): pass")


def test_split_keeps_every_file_on_one_side():
    files = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5])
    train, how = split_windows(files)
    assert how == "file" and train.any() and (~train).any()
    assert not set(files[train].tolist()) & set(files[~train].tolist())
    assert (~train).sum() >= 0.25 * len(files)
    one_file, how = split_windows(torch.zeros(8, dtype=torch.long))
    assert how == "window" and one_file.sum() == 6


def test_control_labels_are_fixed_per_token_type():
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (2000,), generator=gen)
    labels[::7] = -1
    tokens = torch.randint(0, 50, (2000,), generator=gen)
    control = control_labels(labels, tokens, 3)
    assert ((control == -1) == (labels == -1)).all()
    for t in range(50):
        values = control[(tokens == t) & (control >= 0)].unique()
        assert len(values) <= 1


def planted(n=1200, d=24, classes=4, seed=0, plant=True):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    features = torch.randn(n, d, generator=gen)
    if plant:
        directions = torch.randn(classes, d, generator=gen)
        features = features + 4 * directions[labels]  # the class is linearly readable
    return features, labels


def test_a_planted_feature_is_read_and_noise_gives_the_baseline():
    features, labels = planted()
    noise, _ = planted(plant=False, seed=1)
    tokens = torch.arange(len(labels)) % 300
    train = torch.arange(len(labels)) < 900
    classes = {"planted": ("a", "b", "c", "d")}
    accuracy, control, majority, alone, n_train, n_test = probe_features(
        [noise, features], {"planted": labels}, classes, tokens, train)
    assert accuracy[0, 1] > 0.97  # the depth holding the feature
    assert abs(float(accuracy[0, 0] - majority[0])) < 0.1  # noise: about the majority class
    assert accuracy[0, 0] < 0.45
    assert int(n_train[0]) == 900 and int(n_test[0]) == 300
    assert 0 <= float(control[0, 1]) <= 1 and 0 <= float(alone[0]) <= 1


def test_probe_layers_on_a_tiny_model(tiny_lm):
    text = probe_text(tiny_lm, n_windows=8, seq_len=64)
    result = probe_layers(tiny_lm, text)
    P, D = len(result.properties), tiny_lm.structure.n_layers + 1
    assert result.accuracy.shape == result.control.shape == (P, D)
    assert result.majority.shape == result.token_alone.shape == (P,)
    assert ((result.accuracy >= 0) & (result.accuracy <= 1)).all()
    assert (result.n_train + result.n_test == result.n_labelled).all()
    assert result.split == "file"


def test_exactly_linear_weights_fit_with_no_residual():
    L = 6
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 8, generator=gen).double(), torch.randn(16, 8, generator=gen).double()
    depths = torch.arange(L, dtype=torch.float64) / L
    weights = torch.stack([a + float(t) * b for t in depths])
    theta_a, theta_b, residual = linear_fit(weights, depths)
    assert residual.max() < 1e-10
    assert torch.allclose(theta_a, a, atol=1e-10) and torch.allclose(theta_b, b, atol=1e-10)
    unrelated = torch.randn(L, 64, 64, generator=gen)
    _, _, residual = linear_fit(unrelated, depths)
    assert residual.min() > 0.4  # nothing shared: near the chance level, far from 0
    assert torch.allclose(chance_residual(depths).pow(2).sum(), torch.tensor(L - 2.0, dtype=torch.float64))


@torch.no_grad()
def test_depth_fit_on_a_model_made_linear_in_depth(tiny_lm):
    copy = tiny_lm.private_copy()
    L = copy.structure.n_layers
    layers = copy.linear_layers()
    for role in ("attn.qkv", "attn.o", "mlp.in", "mlp.out"):
        first, last = layers[f"blocks.0.{role}"].clone(), layers[f"blocks.{L - 1}.{role}"].clone()
        for layer in range(L):
            layers[f"blocks.{layer}.{role}"].copy_(first + layer / (L - 1) * (last - first))
    fit = depth_fit(copy)
    assert fit.layers == tuple(range(L)) and fit.labels == ("Q", "K", "V", "O", "MLP in", "MLP out")
    assert fit.qkv_layout == "blocks"  # GPT-2's fused c_attn, split into its three blocks of columns
    assert fit.residual.max() < 1e-5
    assert (fit.cosine > 0).all()
    unchanged = depth_fit(tiny_lm)
    assert unchanged.residual.min() > 0.1  # random weights are not linear in depth


@torch.no_grad()
def test_share_loss_is_what_the_lab_edit_changes(tiny_lm):
    from analysis.compress.edits import apply_
    from analysis.compress.prune.factorize import ShareLayers

    for rank in (0, 2):
        fit = depth_fit(tiny_lm, share_rank=rank)
        edited = tiny_lm.private_copy()
        apply_(edited, ShareLayers(source=0, target=1, rank=rank))
        before, paths = tiny_lm.linear_layers(), edited._paths()
        change = after_norm = 0.0
        for role in ("attn.qkv", "attn.o", "mlp.in", "mlp.out"):  # the layers the edit shares (Q, K, V fused)
            module = edited.plain_model().get_submodule(paths[f"blocks.1.{role}"])
            assert type(module).__name__ == "SharedLinear"
            width = before[f"blocks.1.{role}"].shape[1]
            bias = module(torch.zeros(1, width))
            effective = (module(torch.eye(width)) - bias).T  # [out, in]: the map the edited layer applies
            change += float((effective - before[f"blocks.1.{role}"]).double().pow(2).sum())
            after_norm += float(before[f"blocks.1.{role}"].double().pow(2).sum())
        assert fit.share_total[0] == pytest.approx((change / after_norm) ** 0.5, rel=1e-4)
    assert fit.share_total[0] < depth_fit(tiny_lm, share_rank=0).share_total[0]  # a delta recovers some


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
def test_share_residual_is_what_the_edits_svd_leaves(shape):
    """The Gram-matrix projection leaves what the lab's truncated SVD leaves, on either side."""
    from analysis.compress.prune.factorize import truncated_svd

    g = torch.Generator().manual_seed(0)
    source, target = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    for rank in (1, 3, 12):
        a, b = truncated_svd((target - source).double(), rank)
        svd = (target - source).double() - b @ a
        ours = _share_residual(source, target, rank)
        assert torch.allclose(ours, svd, atol=1e-9 * float(svd.norm()) + 1e-12), rank
    assert torch.equal(_share_residual(source, target, 0), (target - source).double())


def test_depth_fit_tells_each_family_then_each_pair(tiny_lm):
    told = []
    depth_fit(tiny_lm, share_rank=1, progress=lambda f, m: told.append((f, m)))
    fit = depth_fit(tiny_lm, share_rank=1)
    fractions = [f for f, _ in told]
    assert len(told) == len(fit.families) + len(fit.layers) - 1 and fractions == sorted(fractions)
    assert fractions[-1] == 1.0 and told[-1][1] == f"block {fit.layers[-1]} sharing block {fit.layers[-2]}'s weights"


def test_image_models_have_no_weights_across_depth(tiny_cnn):
    with pytest.raises(CapabilityError, match="one shape"):
        depth_fit(tiny_cnn)
    with pytest.raises(CapabilityError):
        probe_text(tiny_cnn)


def test_every_sentence_states_the_numbers(tiny_lm):
    from analysis.representations import report

    result = probe_layers(tiny_lm, probe_text(tiny_lm, n_windows=8, seq_len=64))
    sentences = report.property_sentences(result)
    assert len(sentences) == len(result.properties)
    i = 0
    best = int(result.accuracy[i].argmax())
    assert f"best at depth {best}, {100 * float(result.accuracy[i, best]):.0f}%" in sentences[0]
    assert f"majority class {100 * float(result.majority[0]):.0f}%" in sentences[0]
    assert str(f"{int(result.n_labelled[0]):,}") in report.labelled_sentence(result)
    fit = depth_fit(tiny_lm)
    fitted, cosines, shared = report.depth_sentences(fit)
    assert f"{float(fit.cosine.max()):.3f}" in cosines
    assert "Q, K and V are the rows of the model's one fused query/key/value weight" in fitted
    assert f"{100 * float(fit.share_total.min()):.0f}%" in shared
    assert np.isfinite(fit.chance.numpy()).all()


def test_a_fast_tokenizer_is_labelled_through_its_offsets():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["def", "f", "(", "x", "):", "[UNK]"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ and runs of punctuation
    ids, chars = token_characters(PreTrainedTokenizerFast(tokenizer_object=core), "def f(x):")
    assert ids == [0, 1, 2, 3, 4]
    assert chars.tolist() == [0, 4, 5, 6, 7]  # each token labelled by its first character


def _computed_qkv(plain, text_ids, monkeypatch):
    """Per layer, the attention's input [b, pos, d] and the query, key and value [b, heads,
    pos, d_head] that plain transformers' own attention forward computes (rotary switched off,
    so they are the projections themselves), caught at its attention function."""
    import importlib

    module = importlib.import_module(type(plain).__module__)
    seen, inputs = {}, {}
    original = module.eager_attention_forward

    def catch(attention, query, key, value, *args, **kwargs):
        seen[attention.layer_idx] = (query, key, value)
        return original(attention, query, key, value, *args, **kwargs)

    monkeypatch.setattr(module, "eager_attention_forward", catch)
    if hasattr(module, "apply_rotary_pos_emb"):
        monkeypatch.setattr(module, "apply_rotary_pos_emb", lambda q, k, *args, **kwargs: (q, k))
    plain.set_attn_implementation("eager")
    fused = [m for n, m in plain.named_modules() if n.endswith(("attn.c_attn", "attention.query_key_value"))]
    handles = [m.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0]))
               for i, m in enumerate(fused)]
    try:
        with torch.no_grad():
            plain(input_ids=text_ids)
    finally:
        for h in handles:
            h.remove()
    return inputs, seen


@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_split_q_k_v_are_the_models_own_projections(family, tiny_gpt2_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from analysis.representations.depth import split_families, split_qkv, weight_families
    from lib.models import load_model
    from tools.families import save_tiny

    folder = tiny_gpt2_dir if family == "gpt2" else save_tiny("neox", tmp_path / "neox")
    handle = load_model(str(folder))
    layout = {"gpt2": "blocks", "neox": "per-head"}[family]
    assert [handle.heads.qkv_layout(layer) for layer in range(handle.structure.n_layers)] == \
        [layout] * handle.structure.n_layers
    families, found = split_families(handle, weight_families(handle)[1])
    assert found == layout and "attn.qkv" not in families
    ids = torch.randint(0, handle.structure.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    inputs, computed = _computed_qkv(AutoModelForCausalLM.from_pretrained(str(folder)).eval(), ids, monkeypatch)
    n, d_head = handle.structure.n_heads, handle.structure.d_head
    weights = handle.weights()
    for layer in range(handle.structure.n_layers):
        biases = split_qkv(weights[f"blocks.{layer}.attn.qkv.bias"][:, None], layout, d_head)
        for j, role in enumerate(("attn.q", "attn.k", "attn.v")):
            ours = inputs[layer] @ families[role][layer].T + biases[j][:, 0]  # [b, pos, n * d_head]
            ours = ours.view(*ours.shape[:2], n, d_head).transpose(1, 2)  # [b, heads, pos, d_head]
            assert torch.allclose(ours, computed[layer][j], atol=1e-5), (family, layer, role)
    wrong = "per-head" if layout == "blocks" else "blocks"  # the test can fail: the other layout gives other rows
    swapped = split_qkv(handle.linear_layers()["blocks.0.attn.qkv"], wrong, d_head)[0]
    assert not torch.allclose(swapped, families["attn.q"][0])


def test_split_families_keep_what_the_shared_fused_weight_loses(tiny_lm):
    fit = depth_fit(tiny_lm)
    layers = tiny_lm.linear_layers()
    change = (layers["blocks.1.attn.qkv"] - layers["blocks.0.attn.qkv"]).double()  # pure sharing, blocks 0 -> 1
    fused_loss = float(change.norm() / layers["blocks.1.attn.qkv"].double().norm())
    parts = [fit.labels.index(x) for x in ("Q", "K", "V")]
    target_norms = [float(w.double().norm()) for w in layers["blocks.1.attn.qkv"].chunk(3, 0)]
    recombined = sum(float(fit.share_loss[p, 0]) ** 2 * t**2 for p, t in zip(parts, target_norms))
    assert recombined ** 0.5 / sum(t**2 for t in target_norms) ** 0.5 == pytest.approx(fused_loss, rel=1e-5)
