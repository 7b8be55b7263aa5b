import json

import pytest
import torch

from lib import models
from lib.models import load_model


def test_local_folder_loads_as_causal_lm(tiny_lm):
    assert tiny_lm.kind == "causal-lm"
    s = tiny_lm.structure
    assert (s.n_layers, s.n_heads, s.d_model, s.d_vocab) == (3, 4, 32, 257)
    assert tiny_lm.tokenizer.bos_token_id == 256
    logits = tiny_lm.forward(torch.tensor([[256, 97, 98]]))
    assert logits.shape == (1, 3, 257)


def test_bridge_logits_match_plain_hf_forward(tiny_gpt2_dir, tiny_lm):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(tiny_gpt2_dir), attn_implementation="eager").eval()
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(tiny_lm.forward(tokens), hf(tokens).logits, atol=1e-5)


def test_hub_name_goes_through_the_same_folder_loader(tiny_gpt2_dir, monkeypatch):
    monkeypatch.setattr(models, "_download", lambda name, allow_pickle: tiny_gpt2_dir)
    handle = load_model("someone/tiny-gpt2")
    assert handle.spec == "someone/tiny-gpt2"
    assert handle.fingerprint == load_model(str(tiny_gpt2_dir)).fingerprint


def test_unreachable_hub_gives_clear_error():
    with pytest.raises(models.HubUnavailableError, match="not reachable"):
        load_model("gpt2-this-model-is-not-cached")


@pytest.mark.parametrize("spec, error", [
    ("zoo:nope", models.ModelNotFoundError),
    ("/no/such/folder", models.ModelNotFoundError),
    ("not a name!", models.ModelNotFoundError),
    ("", models.ModelNotFoundError),
])
def test_bad_names(spec, error):
    with pytest.raises(error):
        load_model(spec)


def test_folder_without_checkpoint(tmp_path):
    with pytest.raises(models.NoCheckpointError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(models.NoCheckpointError, match="no weights"):
        load_model(str(tmp_path))


def test_pickled_checkpoint_refused_unless_opted_in(tmp_path, tiny_gpt2_dir):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(tiny_gpt2_dir))
    model.save_pretrained(str(tmp_path), safe_serialization=False)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    for f in tiny_gpt2_dir.glob("tokenizer*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    if not any(tmp_path.glob("*.bin")):  # newer transformers always write safetensors
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(models.PickleRefusedError, match="allow_pickle=True"):
        load_model(str(tmp_path))
    handle = load_model(str(tmp_path), allow_pickle=True)
    assert handle.kind == "causal-lm"


def test_remote_code_refused(tmp_path, tiny_gpt2_dir):
    for f in tiny_gpt2_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.RemoteCodeRefusedError, match="trust_remote_code"):
        load_model(str(tmp_path))


def test_too_large_model_refused_with_numbers(tiny_gpt2_dir):
    with pytest.raises(models.ModelTooLargeError, match="GiB"):
        load_model(str(tiny_gpt2_dir), available_bytes=10_000)


def test_fingerprint_detects_any_weight_change(tiny_gpt2_dir):
    handle = load_model(str(tiny_gpt2_dir))
    before = handle.fingerprint
    assert handle.current_fingerprint() == before
    next(iter(handle.weights().values())).data[0] += 1e-3
    assert handle.current_fingerprint() != before


def test_image_model_roundtrip(tmp_path):
    from lib.zoo.nets import DigitsCNN

    torch.manual_seed(0)
    net = DigitsCNN(width=4)
    models.save_image_model(net, "digits-cnn", tmp_path, width=4)
    handle = load_model(str(tmp_path))
    assert handle.kind == "image-classifier"
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(handle.forward(x), net.eval()(x))
    assert [name for name, _ in handle.structure.stages] == list(net.stages)
    assert handle.fingerprint == load_model(tmp_path).fingerprint  # loading is deterministic: nothing random


def test_simultaneous_loads_all_succeed(tiny_gpt2_dir):
    """Two browser sessions load at once: each load gets its own model, and torch's
    initialisers are the real ones afterwards (meta builds switch them off while they run)."""
    import threading

    import torch

    from lib.models import load_model

    inits = {name: getattr(torch.nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_")}
    specs = ["zoo:induction-2l", str(tiny_gpt2_dir), "zoo:digits-cnn"]
    expected = {spec: load_model(spec).fingerprint for spec in specs}
    got, errors = {}, []

    def load(spec):
        try:
            got[spec] = load_model(spec).fingerprint
        except Exception as e:  # noqa: BLE001 - the test reports every failure
            errors.append(f"{spec}: {e}")

    threads = [threading.Thread(target=load, args=(spec,)) for spec in specs * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == expected
    assert all(getattr(torch.nn.init, name) is fn for name, fn in inits.items())
