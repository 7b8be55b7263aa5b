"""The load-time check that recorded activations are the model's own (lib.verify)."""

from __future__ import annotations

import torch

from lib import data
from lib.metrics import model_inputs
from lib.verify import verify


def test_every_family_verifies(family_handles):
    for name, handle in family_handles.items():
        tokens = torch.randint(0, handle.structure.d_vocab, (2, 24), generator=torch.Generator().manual_seed(0))
        v = verify(handle, tokens)
        assert v.ok, (name, v.text())
        assert v.text().startswith("verified: outputs match to")


def test_image_models_verify(tiny_cnn):
    v = verify(tiny_cnn, model_inputs(data.digits_batch(n=8)))
    assert v.ok and "torch module" in v.paths


def test_a_hooked_path_that_changes_the_outputs_is_reported(tiny_gpt2_dir):
    from lib.models import load_model

    handle = load_model(str(tiny_gpt2_dir))
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    assert verify(handle, tokens).ok
    # a fault in the hooking library: the bridge's first block adds a constant that the plain model does not
    broken = handle.model.ln_final.register_forward_hook(lambda m, a, out: out + 0.5)
    try:
        v = verify(handle, tokens)
    finally:
        broken.remove()
    assert not v.ok
    assert v.max_abs_diff > v.tolerance
    assert "outputs differ by" in v.text() and "may not be this model's own" in v.text()
    assert verify(handle, tokens).ok  # nothing left behind


def test_half_precision_gets_a_looser_tolerance(tiny_gpt2_dir):
    from lib.models import load_model

    handle = load_model(str(tiny_gpt2_dir), dtype="bfloat16")
    v = verify(handle, torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0)))
    assert v.ok, v.text()
    assert v.tolerance >= 1e-3 * v.scale


def test_a_deep_half_precision_model_verifies_and_a_fault_still_shows(tmp_path):
    """Rounding in bfloat16 grows with depth: 32 Llama layers pass as rounding, and a fault in
    the hooked path (see above) is still told apart from it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lib.models import load_model
    from lib.zoo.tokenizer import BYTE_VOCAB_SIZE, save_byte_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=192, num_hidden_layers=32,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=256, eos_token_id=256, pad_token_id=256)
    LlamaForCausalLM(config).to(torch.bfloat16).eval().save_pretrained(str(tmp_path))
    save_byte_tokenizer(tmp_path, 64)
    handle = load_model(str(tmp_path))
    assert handle.dtype == torch.bfloat16
    tokens = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    assert verify(handle, tokens).ok, verify(handle, tokens).text()
    broken = handle.model.ln_final.register_forward_hook(lambda m, a, out: out + 0.5)
    try:
        assert not verify(handle, tokens).ok
    finally:
        broken.remove()
