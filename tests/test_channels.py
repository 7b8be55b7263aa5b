"""Attention channels (METHODS.md §2): composition scores against TransformerLens, the
Gram-form SVD, low-rank channels, head roles, interventions (three checks each: they change
what they should, the base is bit-identical afterwards, no hook remains), a grouped-query
rotary model, and the induction circuit of zoo:induction-2l."""

from __future__ import annotations

import pytest
import torch

from analysis.channels import circuits as ch
from analysis.channels import heads, report
from lib import data
from lib.errors import CapabilityError
from lib.handle import Point
from lib.hooks import count_hooks
from lib.metrics import metrics_from_outputs
from lib.scoring import prepare_base


def save_tiny_llama(folder, seed: int = 0) -> None:
    """A random Llama-style model (rotary, grouped-query attention: 4 query heads share 2
    key/value heads, RMSNorm, gated MLP) with the byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lib.zoo.tokenizer import BYTE_VOCAB_SIZE, save_byte_tokenizer

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=256, eos_token_id=256, pad_token_id=256, tie_word_embeddings=False)
    LlamaForCausalLM(config).eval().save_pretrained(str(folder))
    save_byte_tokenizer(folder, 64)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from lib.models import load_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(folder)
    return load_model(str(folder))


@pytest.fixture(scope="module")
def circuits(tiny_lm):
    return ch.circuits(tiny_lm)


@pytest.fixture(scope="module")
def composition(circuits):
    return ch.composition_scores(circuits)


@pytest.fixture(scope="module")
def batch(tiny_lm):
    return data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=2)


@pytest.fixture(scope="module")
def induction():
    from lib.models import load_model

    return load_model("zoo:induction-2l")


# ------------------------------------------------------------------ weights


@pytest.mark.parametrize("model", ["tiny_lm", "llama"])
def test_composition_scores_equal_transformer_lens(model, request):
    handle = request.getfixturevalue(model)
    comp = ch.composition_scores(ch.circuits(handle))
    reference = handle.heads.circuit_model()
    for mode in ch.MODES:
        expected = reference.all_composition_scores(mode).scores.detach()
        assert comp.scores[mode].shape == expected.shape
        assert torch.allclose(comp.scores[mode], expected, atol=1e-5, rtol=0), mode
    assert comp.baseline == pytest.approx(handle.structure.d_model ** -0.5)
    assert torch.equal(comp.relative("K"), comp.scores["K"] / comp.baseline)


def test_gram_svd_is_the_svd_of_the_product(tiny_lm, circuits):
    reference = tiny_lm.heads.circuit_model()
    assert torch.allclose(circuits.ov_S, reference.OV.S.detach(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(circuits.qk_S, reference.QK.S.detach(), rtol=1e-4, atol=1e-6)
    ov = (circuits.W_V @ circuits.W_O).double()  # [L, H, d, d], dense only here, as the check
    v, s = circuits.ov_V.double(), circuits.ov_S.double()
    # M^T M V = V S^2 and V^T V = I: the columns of V are the directions each head writes
    assert torch.allclose(ov.transpose(-2, -1) @ ov @ v, v * s[..., None, :] ** 2, atol=1e-5)
    assert torch.allclose(v.transpose(-2, -1) @ v, torch.eye(v.shape[-1], dtype=torch.float64).expand_as(
        v.transpose(-2, -1) @ v), atol=1e-4)
    assert torch.allclose(circuits.W_O.double() @ v, circuits.ov_in.double(), atol=1e-5)  # W_O v_i
    assert torch.allclose(circuits.W_O.double().transpose(-2, -1) @ circuits.ov_out.double(), v, atol=1e-4)


def test_per_component_scores_reproduce_the_full_score_for_a_rank_one_ov():
    gen = torch.Generator().manual_seed(1)
    L, H, d, r = 2, 3, 16, 4
    w_q, w_k, w_v = (torch.randn(L, H, d, r, generator=gen) for _ in range(3))
    w_o = torch.randn(L, H, r, d, generator=gen)
    w_v[0, 1] = torch.randn(d, 1, generator=gen) @ torch.randn(1, r, generator=gen)  # OV of L0H1 has rank 1
    c = ch.from_factors(w_q, w_k, w_v, w_o)
    comp = ch.composition_scores(c)
    for mode in ch.MODES:
        for reader in [(1, 0), (1, 2)]:
            parts = ch.channel_components(c, comp, (0, 1), reader, mode)
            assert float(parts.singular_values[1:].abs().max()) < 1e-5 * float(parts.singular_values[0])
            assert float(parts.scores[0]) == pytest.approx(float(comp.scores[mode][0, 1, reader[0], reader[1]]),
                                                           rel=1e-5)
            assert float(parts.shares[0]) == pytest.approx(1.0, abs=1e-6)


def test_components_add_up_to_the_pair_score(circuits, composition):
    parts = ch.channel_components(circuits, composition, (0, 2), (2, 1), "K")
    assert parts.full == pytest.approx(parts.channel.score, rel=1e-5)  # sqrt(sum s^2 score^2 / sum s^2)
    assert float(parts.shares.sum()) == pytest.approx(1.0, abs=1e-6)


def test_strongest_pairs_are_sorted_and_only_forward(composition):
    top = composition.strongest("V", 5)
    assert [t.relative for t in top] == sorted((t.relative for t in top), reverse=True)
    assert all(t.writer[0] < t.reader[0] for t in top)
    best = composition.relative("V").masked_fill(~composition.valid, 0).max()
    assert top[0].relative == pytest.approx(float(best))
    assert not composition.scores["Q"][1, :, 0].any() and not composition.scores["Q"][1, :, 1].any()


def test_bad_requests_are_refused_clearly(tiny_lm, circuits, composition):
    from lib.models import load_model, save_image_model
    from lib.zoo.nets import DigitsCNN

    with pytest.raises(ch.ChannelsError, match="one of Q, K, V"):
        composition.relative("X")
    with pytest.raises(ch.ChannelsError, match="earlier layer"):
        ch.channel_components(circuits, composition, (2, 0), (1, 0), "K")
    with pytest.raises(ch.ChannelsError, match="not in this model"):
        ch.channel_components(circuits, composition, (0, 9), (1, 0), "K")
    with pytest.raises(ch.ChannelsError, match="components 0..7"):
        heads.check_edit(circuits, heads.HeadEdit(0, 0, (8,)))
    with pytest.raises(ch.ChannelsError, match="finite"):
        heads.check_edit(circuits, heads.HeadEdit(0, 0, (), float("nan")))
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    save_image_model(DigitsCNN(width=4), "digits-cnn", folder, width=4)
    with pytest.raises(CapabilityError, match="no attention heads"):
        ch.circuits(load_model(str(folder)))


# ------------------------------------------------------------------ head roles


def test_head_roles_equal_transformer_lens_detect_head(tiny_lm):
    from transformer_lens import head_detector as hd

    tokens = heads.role_probe(tiny_lm, n=3, block=7)
    assert tokens.shape == (3, 22) and (tokens[:, 0] == 256).all()
    roles = heads.head_roles(tiny_lm, tokens)
    for name, field in [("previous_token_head", "previous_token"), ("duplicate_token_head", "duplicate_token"),
                        ("induction_head", "induction")]:
        expected = torch.zeros(3, 4)
        for row in tokens:
            _, cache = tiny_lm.model.run_with_cache(row[None], prepend_bos=False)
            pattern = getattr(hd, f"get_{name}_detection_pattern")(row[None])
            for l in range(3):
                for h in range(4):
                    expected[l, h] += hd.compute_head_attention_similarity_score(
                        cache[f"blocks.{l}.attn.hook_pattern"][0, h], pattern, exclude_bos=False,
                        exclude_current_token=False, error_measure="mul") / len(tokens)
        assert torch.allclose(getattr(roles, field), expected, atol=1e-5), field
    assert count_hooks(tiny_lm.model) == 0


def test_hopfield_regimes_and_sink_on_hand_made_patterns():
    T = 12
    tokens = torch.arange(T)[None]
    uniform = torch.ones(T, T).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    previous = torch.zeros(T, T)
    previous[0, 0] = 1
    previous[torch.arange(1, T), torch.arange(T - 1)] = 1
    sink = torch.zeros(T, T)
    sink[:, 0] = 0.5
    sink[torch.arange(T), torch.arange(T)] += 0.5
    sink[0, 0] = 1
    # pairs of keys with 0.5 each beyond the sink: k = 2 keys reach 90%
    roles = heads.roles_from_patterns([torch.stack([uniform, previous, sink])[None]], tokens)
    assert roles.regime[0].tolist() == [0, 2, 2]
    assert roles.previous_token[0, 1] == pytest.approx((T - 1) / T)  # query 0 has no previous token but counts
    assert roles.sink[0].tolist() == pytest.approx([float(uniform[1:, 0].mean()), 1 / (T - 1), 0.5])
    assert roles.keys_90[0, 1] == 1 and roles.keys_90[0, 2] == 2
    # uniform over q+1 keys: k = ceil(0.9 (q + 1)) keys
    k = torch.tensor([float(torch.tensor(0.9 * (q + 1)).ceil()) for q in range(1, T)])
    assert roles.key_fraction[0, 0] == pytest.approx(float((k / torch.arange(2, T + 1)).mean()), rel=1e-5)


# ------------------------------------------------------------------ interventions


def _logits(handle, tokens, layer=0):
    """Logits through the hooked (bridge) path with a hook that changes nothing."""
    with handle.hooks([(Point("z", layer), lambda z: None)]):
        return handle.forward(tokens)


def test_alpha_one_changes_nothing(tiny_lm, circuits, batch):
    plain = _logits(tiny_lm, batch.tokens, 1)
    for edit in [heads.HeadEdit(1, 2, (0,), 1.0), heads.HeadEdit(1, 2, (), 1.0), heads.HeadEdit(1, 2, (0, 3), 1.0)]:
        with heads.editing(tiny_lm, circuits, [edit]):
            assert torch.equal(tiny_lm.forward(batch.tokens), plain)
    with heads.editing(tiny_lm, circuits, [heads.HeadEdit(1, 2, (0,), 0.5)]):
        assert not torch.allclose(tiny_lm.forward(batch.tokens), plain)


def test_zeroing_a_head_removes_exactly_its_contribution(tiny_lm, circuits, batch):
    layer, head, dh = 1, 2, tiny_lm.structure.d_head
    z = tiny_lm.record(batch.tokens, [Point("z", layer)])[Point("z", layer)]
    w_o = tiny_lm.hf_model.transformer.h[layer].attn.c_proj.weight  # GPT-2 Conv1D: x @ W, [d, d]
    contribution = z[:, :, head] @ w_o[head * dh:(head + 1) * dh]  # [b, pos, d]
    with tiny_lm.hooks([(Point("attn_out", layer), lambda out: out - contribution)]):
        removed = tiny_lm.forward(batch.tokens)
    with heads.editing(tiny_lm, circuits, [heads.HeadEdit(layer, head)]):
        zeroed = tiny_lm.forward(batch.tokens)
    assert torch.allclose(zeroed, removed, atol=1e-5)
    assert not torch.allclose(zeroed, _logits(tiny_lm, batch.tokens), atol=1e-3)


def test_scaling_a_component_scales_the_output_along_its_direction(tiny_lm, circuits, batch):
    layer, head, i, alpha, dh = 0, 1, 2, 0.25, tiny_lm.structure.d_head
    point = Point("attn_out", layer)
    z = tiny_lm.record(batch.tokens, [Point("z", layer)])[Point("z", layer)]
    w_o = tiny_lm.hf_model.transformer.h[layer].attn.c_proj.weight
    r = z[:, :, head] @ w_o[head * dh:(head + 1) * dh]  # the head's output [b, pos, d]
    v = circuits.ov_V[layer, head, :, i]
    before = tiny_lm.record(batch.tokens, [point])[point]
    with heads.editing(tiny_lm, circuits, [heads.HeadEdit(layer, head, (i,), alpha)]):
        after = tiny_lm.record(batch.tokens, [point])[point]
    change = after - before
    change = change - change.mean(-1, keepdim=True)  # the next LayerNorm removes the mean (W_O was centred)
    expected = (alpha - 1) * (r @ v)[..., None] * v
    assert torch.allclose(change, expected, atol=1e-5)


def test_interventions_leave_no_hook_and_the_base_untouched(tiny_lm, circuits, batch):
    weights = {k: t.clone() for k, t in tiny_lm.weights().items()}
    fingerprint = tiny_lm.fingerprint
    with pytest.raises(RuntimeError, match="boom"):
        with heads.editing(tiny_lm, circuits, [heads.HeadEdit(0, 0), heads.HeadEdit(2, 1, (1,), 3.0)]):
            assert count_hooks(tiny_lm.model) == 2
            raise RuntimeError("boom")
    assert count_hooks(tiny_lm.model) == 0
    with pytest.raises(ch.ChannelsError):  # a bad edit is refused before any hook goes on
        with heads.editing(tiny_lm, circuits, [heads.HeadEdit(0, 0), heads.HeadEdit(0, 7)]):
            pass
    assert count_hooks(tiny_lm.model) == 0
    result = heads.intervene(tiny_lm, batch, circuits, heads.HeadEdit(0, 3), (1, 0), batch.tokens[:1, :10])
    assert result.metric == "bits_per_byte" and result.after.kl_to_base > 0
    assert result.pattern_before.shape == (10, 10) and not torch.allclose(result.pattern_before, result.pattern_after)
    assert count_hooks(tiny_lm.model) == 0
    assert tiny_lm.current_fingerprint() == fingerprint  # circuit_model() and the hooks left the base alone
    assert all(torch.equal(t, weights[k]) for k, t in tiny_lm.weights().items())
    raw = tiny_lm.outputs(batch.tokens)  # the page's shared base, prepared once, and its metrics: the same result
    shared = heads.intervene(tiny_lm, batch, circuits, heads.HeadEdit(0, 3), (1, 0), batch.tokens[:1, :10],
                             base=prepare_base(raw, batch), before=metrics_from_outputs(raw, batch, tiny_lm.n_params,
                                                                                       tiny_lm.size_bits))
    assert shared.before.bits_per_byte == pytest.approx(result.before.bits_per_byte, rel=1e-5)
    assert shared.after.kl_to_base == pytest.approx(result.after.kl_to_base, rel=1e-4, abs=1e-7)
    assert shared.after.bits_per_byte == pytest.approx(result.after.bits_per_byte, rel=1e-5)


# ------------------------------------------------------------------ grouped-query rotary model


def test_llama_style_model_runs_every_analysis_with_the_rotary_note(llama):
    c = ch.circuits(llama)
    assert c.rotary and c.grouped and c.n_kv_heads == 2 and c.W_K.shape == (2, 4, 32, 8)
    assert torch.equal(c.W_K[:, 0], c.W_K[:, 1])  # query heads 0 and 1 share key/value head 0
    comp = ch.composition_scores(c)
    assert comp.rotary and "rotary" in report.approximation_note(c) and "grouped" in report.approximation_note(c)
    parts = ch.channel_components(c, comp, (0, 1), (1, 3), "Q")
    assert parts.full == pytest.approx(parts.channel.score, rel=1e-5)
    roles = heads.head_roles(llama, heads.role_probe(llama, n=2))
    assert roles.induction.shape == (2, 4)
    tokens = heads.role_probe(llama, n=1, block=5)
    assert heads.attention_patterns(llama, tokens).shape == (2, 4, 16, 16)
    lm_batch = data.code_batch(llama.tokenizer, seq_len=16, n_windows=2)
    result = heads.intervene(llama, lm_batch, c, heads.HeadEdit(0, 1, (0,), 0.0), (1, 2), tokens)
    assert result.after.kl_to_base > 0
    # RMSNorm: nothing is centred, so the component edit is exactly r <- r - (r · v) v
    point = Point("attn_out", 0)
    z = llama.record(lm_batch.tokens, [Point("z", 0)])[Point("z", 0)]
    w_o = llama.hf_model.model.layers[0].self_attn.o_proj.weight  # [d, H * r]
    r = z[:, :, 1] @ w_o[:, 8:16].T
    v = c.ov_V[0, 1, :, 0]
    before = llama.record(lm_batch.tokens, [point])[point]
    with heads.editing(llama, c, [heads.HeadEdit(0, 1, (0,), 0.0)]):
        after = llama.record(lm_batch.tokens, [point])[point]
    assert torch.allclose(after - before, -(r @ v)[..., None] * v, atol=1e-5)
    assert count_hooks(llama.model) == 0


def test_plain_gpt2_has_no_approximation_note(circuits):
    assert report.approximation_note(circuits) is None


# ------------------------------------------------------------------ the induction circuit


def test_induction_circuit_is_found_and_cutting_it_breaks_induction(induction):
    c = ch.circuits(induction)
    comp = ch.composition_scores(c)
    roles = heads.head_roles(induction, heads.role_probe(induction, seed=3))
    prev, prev_score = roles.best("previous_token")
    ind, ind_score = roles.best("induction")
    assert prev == (0, 0) and ind == (1, 2)  # MODEL_CARD: layer-0 head 0, layer-1 head 2
    assert prev_score > 0.9 and ind_score > 0.5
    top = comp.strongest("K", 1)[0]
    assert (top.writer, top.reader) == (prev, ind) and top.relative > 2
    assert max(comp.strongest(m, 1)[0].relative for m in ("Q", "V")) < top.relative
    sentence = report.circuit_sentence(roles, comp)
    assert "L0H0" in sentence and "L1H2" in sentence and "induction" in sentence
    batch = data.default_batch(induction)
    result = heads.intervene(induction, batch, c, heads.HeadEdit(*prev), ind, heads.role_probe(induction, n=1))
    assert result.before.accuracy > 0.95 and result.after.accuracy < 0.2
    # the reader stops attending to the token after the earlier copy
    assert float(result.pattern_after.diagonal(-14).mean()) < 0.5 * float(result.pattern_before.diagonal(-14).mean())
    assert count_hooks(induction.model) == 0


# ------------------------------------------------------------------ figures and sentences


def test_figures_label_heads_and_tokens(circuits, composition, tiny_lm):
    from analysis.channels import plots as pc
    from analysis.plots import token_label

    tokens = heads.prompt_tokens(tiny_lm, "ab ab")
    assert tokens.labels == ["BOS", "a", "b", " ", "a", "b"] and tokens.ids.shape == (1, 6)
    patterns = heads.attention_patterns(tiny_lm, tokens.ids)
    fig = pc.pattern_heatmap(patterns[1, 0], tokens.labels)
    assert list(fig.layout.xaxis.ticktext) == [token_label(t) for t in tokens.labels]  # repeats stay apart
    assert fig.data[0].z[0][1] is None and fig.data[0].z[2][1] == pytest.approx(float(patterns[1, 0, 2, 1]))
    heat = pc.composition_heatmap(composition, "K")
    assert list(heat.data[0].y)[0] == "L0H0" and list(heat.data[0].y)[-1] == "L1H3"  # writers: layers 0..L-2
    assert list(heat.data[0].x)[0] == "L1H0" and heat.data[0].z[4][0] is None  # L1H0 cannot read L1H0
    top = composition.strongest("K", 3)
    graph = pc.channel_graph(composition, "K", 3, selected=top[0])
    assert [t.line.color for t in graph.data[:3]].count("#d62728") == 1
    labels = [a.text for a in graph.layout.annotations]  # above the edges, on a white ground
    assert "L0H0" in labels and len(labels) == composition.scores["K"].shape[0] * composition.scores["K"].shape[1]
    parts = ch.channel_components(circuits, composition, top[0].writer, top[0].reader, "K")
    assert len(pc.component_bars(parts).data[0].y) == 8
    roles = heads.roles_from_patterns([patterns[l][None] for l in range(3)], tokens.ids)
    assert sum(t.type == "heatmap" for t in pc.role_grid(roles).data) == 5
    assert len(pc.spectra_heatmap(circuits).data) == 2


def test_sentences_state_the_numbers(tiny_lm, circuits, composition, batch):
    T = 6
    prev = torch.zeros(1, 2, T, T)
    prev[0, :, 0, 0] = 1
    prev[0, :, torch.arange(1, T), torch.arange(T - 1)] = 1
    roles = heads.roles_from_patterns([prev], torch.arange(T)[None])
    text = report.roles_sentence(roles)
    assert text.startswith("Previous-token heads: L0H0 (0.83), L0H1 (0.83)")
    assert "no clear induction head (best L0H0, 0.00 < 0.3)" in text and "Regimes: 2 single pattern." in text
    assert "No induction circuit" in report.circuit_sentence(roles, composition)
    result = heads.intervene(tiny_lm, batch, circuits, heads.HeadEdit(0, 1, (0, 2), 1.0), (1, 0), batch.tokens[:1])
    sentence = report.intervention_sentence(result)
    assert sentence.startswith("Scale L0H1 components 0, 2 by 1, on the evaluation set: bits per byte")
    assert "no worse)" in sentence
    assert result.after.kl_to_base == pytest.approx(0, abs=1e-6)
    parts = ch.channel_components(circuits, composition, (0, 0), (2, 3), "V")
    sentence = report.components_sentence(parts)
    k = int(sentence.removeprefix("The strongest ").split(" of ")[0])
    shares = parts.shares.sort(descending=True).values
    assert float(shares[:k].sum()) >= 0.8 and (k == 1 or float(shares[:k - 1].sum()) < 0.8)
    assert f"together carry {float(shares[:k].sum()):.1%}" in sentence
    assert f"alone carries {float(shares[0]):.1%}" in sentence
