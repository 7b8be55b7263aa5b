"""The ModelHandle seam: activation points, readable weights, private copies, real size."""

import threading
from pathlib import Path

import pytest
import torch

from analysis.compress.prune.pruning import Drop, dropping
from lib import data
from lib.errors import CapabilityError
from lib.handle import Point
from lib.hooks import count_hooks
from lib.storage import StoredAs, quantized_bits


@pytest.fixture(scope="module")
def tokens(tiny_lm):
    return data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=2).tokens


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from test_channels import save_tiny_llama

    from lib.models import load_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(folder)
    return load_model(str(folder))


def test_points_record_what_transformer_lens_records(tiny_lm, tokens):
    points = [Point("resid_pre", 0), Point("resid_mid", 1), Point("attn_out", 2), Point("pattern", 1)]
    got = tiny_lm.record(tokens, points)
    _, cache = tiny_lm.model.run_with_cache(tokens, prepend_bos=False)
    for point, name in zip(points, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid",
                                    "blocks.2.hook_attn_out", "blocks.1.attn.hook_pattern"]):
        assert torch.allclose(got[point], cache[name], atol=1e-6)
    assert got[Point("pattern", 1)].shape == (2, 4, 24, 24)  # [batch, head, query, key]
    assert count_hooks(tiny_lm.model) == 0


@pytest.mark.parametrize("model", ["tiny_lm", "llama"])
def test_patterns_alone_come_from_the_plain_model_equal_to_the_bridge(model, request):
    handle = request.getfixturevalue(model)
    tokens = torch.randint(0, handle.structure.d_vocab, (2, 24))
    points = [Point("pattern", layer) for layer in range(handle.structure.n_layers)]
    fast = handle.record(tokens, points)  # patterns only: the plain decoder, eager attention
    _, cache = handle.model.run_with_cache(tokens, prepend_bos=False)
    for p in points:
        assert torch.allclose(fast[p], cache[f"blocks.{p.layer}.attn.hook_pattern"], atol=1e-5)
    assert handle.plain_model().config._attn_implementation == "sdpa"  # switched back
    with pytest.raises(CapabilityError, match="no block 9"):
        handle.record(tokens, [Point("pattern", 9)])


def test_unknown_points_are_refused_clearly(tiny_lm, tiny_cnn, tokens):
    with pytest.raises(CapabilityError, match="no 'stage' activations"):
        tiny_lm.record(tokens, [Point("stage", "conv1")])
    with pytest.raises(CapabilityError, match="no block 7"):
        tiny_lm.record(tokens, [Point("resid_pre", 7)])
    with pytest.raises(CapabilityError, match="no stage 'conv9'"):
        tiny_cnn.record(torch.zeros(1, 1, 8, 8), [Point("stage", "conv9")])
    with pytest.raises(CapabilityError, match="no vocabulary readout"):
        tiny_cnn.blocks.readout(torch.zeros(1, 4))
    assert count_hooks(tiny_lm.model) == 0 and count_hooks(tiny_cnn.model) == 0


def test_linear_layers_have_readable_names_and_are_views(tiny_lm, tokens):
    layers = tiny_lm.linear_layers()
    expected = {f"blocks.{l}.{m}" for l in range(3) for m in ("attn.qkv", "attn.o", "mlp.in", "mlp.out")}
    expected |= {"unembed"}  # GPT-2 keeps q, k and v in one fused projection
    assert set(layers) == expected
    assert layers["blocks.0.mlp.in"].shape == (128, 32) and layers["blocks.0.mlp.out"].shape == (32, 128)
    assert layers["unembed"].shape == (257, 32)
    copy = tiny_lm.private_copy()
    copy.linear_layers()["blocks.1.mlp.out"].zero_()  # [out, in] view of GPT-2's [in, out] Conv1D
    copy.weights()["blocks.1.mlp.out.bias"].zero_()
    with dropping(tiny_lm, [Drop("mlp", 1)]):
        dropped = tiny_lm.forward(tokens)
    assert torch.allclose(copy.forward(tokens), dropped, atol=1e-6)


def test_weights_list_each_tensor_once(tiny_lm):
    weights = tiny_lm.weights()
    assert "embed.weight" in weights and "unembed.weight" not in weights  # tied to the embedding
    assert not any("_original_component" in n or ".attn.q." in n for n in weights)  # no TransformerLens split views
    from transformers import GPT2LMHeadModel

    plain = GPT2LMHeadModel(tiny_lm.hf_model.config)  # what plain transformers counts
    assert tiny_lm.n_params == sum(p.numel() for p in plain.parameters())


def test_private_copy_is_private(tiny_lm, tokens):
    base_out, base_print = tiny_lm.forward(tokens), tiny_lm.current_fingerprint()
    copy = tiny_lm.private_copy()
    assert copy.lock is not tiny_lm.lock and copy.base_fingerprint == tiny_lm.fingerprint
    assert copy.fingerprint == tiny_lm.fingerprint  # same weights, recomputed not inherited
    copy.linear_layers()["blocks.0.attn.qkv"][64:].mul_(0.5)  # the value rows
    copy.weights_changed()
    assert copy.fingerprint != tiny_lm.fingerprint
    assert not torch.allclose(copy.forward(tokens), base_out)
    assert torch.equal(tiny_lm.forward(tokens), base_out) and tiny_lm.current_fingerprint() == base_print
    attention = [m for m in tiny_lm.model.modules() if hasattr(m, "_captured_pre_ln_residual")]
    assert attention and all(m._captured_pre_ln_residual is None for m in attention)  # the copy wrote nothing here


def test_copy_has_no_hooks_even_when_the_base_has_some(tiny_lm, tokens):
    with dropping(tiny_lm, [Drop("block", 0)]):  # this thread holds the lock and two hooks
        copy = tiny_lm.private_copy()
    assert count_hooks(copy.model) == 0 and count_hooks(tiny_lm.model) == 0
    assert torch.equal(copy.forward(tokens), tiny_lm.forward(tokens))

    inside, done = threading.Event(), {}

    def other_session():  # another session's hooks are on the base while we copy
        with dropping(tiny_lm, [Drop("attention", 1)]):
            inside.set()
            threading.Event().wait(0.3)

    thread = threading.Thread(target=other_session)
    thread.start()
    inside.wait()
    done["copy"] = tiny_lm.private_copy()  # waits for the lock
    thread.join()
    assert count_hooks(done["copy"].model) == 0
    assert torch.equal(done["copy"].forward(tokens), tiny_lm.forward(tokens))


def test_copy_in_float64_with_gradients(tiny_lm, tokens):
    copy = tiny_lm.private_copy(dtype=torch.float64, requires_grad=True)
    assert all(p.dtype == torch.float64 and p.requires_grad for p in copy.model.parameters())
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())
    out = copy.forward(tokens)
    assert out.dtype == torch.float64
    assert torch.allclose(out.float(), tiny_lm.forward(tokens), atol=1e-4)
    with torch.enable_grad():
        copy.model(tokens, prepend_bos=False).sum().backward()
    weights = copy.weights()
    assert weights["blocks.0.mlp.in.weight"].grad.abs().sum() > 0 and weights["embed.weight"].grad is not None
    tiny_lm.private_copy()  # the copy's graph never reached the base


def test_removed_parts_change_structure_and_size(tiny_lm, tiny_cnn):
    copy = tiny_lm.private_copy()
    copy.remove_(Drop("attention", 1))
    d = 32  # q, k, v, o weights and biases, and the block's first LayerNorm
    assert tiny_lm.n_params - copy.n_params == 4 * (d * d + d) + 2 * d
    assert tiny_lm.size_bits - copy.size_bits == 32 * (4 * (d * d + d) + 2 * d)
    assert ("removed", "attention 1") in copy.describe() and copy.structure.removed == ("attention 1",)
    assert tiny_lm.structure.removed == ()
    cnn_copy = tiny_cnn.private_copy()
    cnn_copy.remove_(Drop("stage", "conv2"))
    assert dict(cnn_copy.structure.stages)["conv2"] == "removed (identity)"
    assert tiny_cnn.n_params - cnn_copy.n_params == 4 * 4 * 9 + 4
    assert "conv2" not in cnn_copy.linear_layers() and "conv2" in tiny_cnn.linear_layers()


def test_size_counts_codes_scales_and_zero_points(tiny_cnn):
    """Hand-worked: head is Linear(64 -> 10), 640 float32 weights = 20,480 bits. Stored as
    int4 in groups of 64 (10 groups) with a float16 scale and a 4-bit zero point per
    group: 640 x 4 + 10 x 16 + 10 x 4 = 2,560 + 160 + 40 = 2,760 bits."""
    assert quantized_bits(640, code_bits=4, n_groups=10, scale_bits=16, zero_bits=4) == 2760
    copy = tiny_cnn.private_copy()
    copy.storage["head.weight"] = StoredAs(2760, "int4 g64")
    assert tiny_cnn.size_bits - copy.size_bits == 20480 - 2760
    assert copy.n_params == tiny_cnn.n_params  # quantized weights are still parameters


def test_bundled_cnn_weights_are_named_by_stage():
    from lib.models import load_model

    handle = load_model("zoo:digits-cnn")
    assert set(handle.linear_layers()) == {"conv1", "conv2", "conv3", "fc1", "head"}
    assert "conv1.0.weight" in handle.weights()


def test_analyses_never_branch_on_the_backend():
    """DESIGN: backend differences live in lib/handle.py only."""
    root = Path(__file__).resolve().parents[1] / "analysis"
    for path in root.glob("*.py"):
        text = path.read_text()
        for needle in ("BridgeHandle", "TorchHandle", "hook_resid", "hook_attn", "hook_mlp", ".model.stages",
                       "blocks.{"):
            assert needle not in text, f"{path.name} mentions {needle}"


def _llama_folder(folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lib.zoo.tokenizer import BYTE_VOCAB_SIZE, save_byte_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=256, eos_token_id=256, pad_token_id=256)
    LlamaForCausalLM(config).eval().save_pretrained(str(folder))
    save_byte_tokenizer(folder, 64)
    return folder


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama", "zoo:code-lm", "zoo:induction-2l"])
def test_fast_forward_equals_the_bridge(spec, tiny_lm, tmp_path):
    """Without hooks the forward runs the plain transformers model on the same weights;
    with a hook the bridge runs, and the hook fires."""
    from lib.models import load_model

    handle = {"tiny-gpt2": lambda: tiny_lm, "tiny-llama": lambda: load_model(str(_llama_folder(tmp_path)))}.get(
        spec, lambda: load_model(spec))()
    tokens = torch.randint(0, handle.structure.d_vocab - 1, (2, 20), generator=torch.Generator().manual_seed(0))
    fast = handle.forward(tokens)
    bridge = handle.model(tokens, prepend_bos=False)
    torch.testing.assert_close(fast, bridge, rtol=1e-5, atol=1e-4)
    assert handle._plain_model is not None  # the fast path really ran
    fired = []
    with handle.hooks([(Point("resid_post", 0), lambda t: fired.append(1))]):
        handle.forward(tokens)
    assert fired == [1] and count_hooks(handle.model) == 0


def test_fast_path_of_a_copy_sees_the_copys_edits(tiny_lm, tokens):
    copy = tiny_lm.private_copy()
    copy.linear_layers()["blocks.2.attn.qkv"][32:64].mul_(0.25)  # the key rows, which the bridge reads as a view
    torch.testing.assert_close(copy.forward(tokens), copy.model(tokens, prepend_bos=False), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(copy.forward(tokens), tiny_lm.forward(tokens))


def test_fingerprint_reads_scalar_tensors():
    """BatchNorm keeps a 0-d counter; a fingerprint over it must not fail."""
    from lib.storage import weight_fingerprint

    one = weight_fingerprint(iter([("n", torch.tensor(3)), ("w", torch.ones(2))]))
    assert one != weight_fingerprint(iter([("n", torch.tensor(4)), ("w", torch.ones(2))]))


def test_a_hooked_forward_leaves_no_attention_patterns_behind(tiny_lm):
    """TransformerLens keeps every layer's pattern of its last forward on the modules (540 MB
    for GPT-2 small at 15 x 256 tokens); the handle drops them when its hooks go."""
    from lib.handle import Point
    from lib.hooks import TL_STASHED

    tokens = torch.randint(0, 200, (2, 12))
    got = tiny_lm.record(tokens, [Point("resid_pre", 1), Point("resid_post", tiny_lm.structure.n_layers - 1)])
    assert len(got) == 2
    left = [name for m in tiny_lm.model.modules() for name in TL_STASHED
            if isinstance(getattr(m, name, None), torch.Tensor)]
    assert left == []
