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
