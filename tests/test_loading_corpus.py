"""One table of bad model folders and names, each refused by `load_model` with a clear
`ModelLoadError` before any model is built (issue 17 items 1-3, issue 9 item 1).

Every folder is a copy of the tiny GPT-2 of conftest (3 layers, width 32) or of a
width-4 DigitsCNN, with one thing broken. After each case no model was booted or
loaded: the spies on `TransformerBridge.boot_transformers` and `load_state_dict`
were never called (the memory-guard cases ask for models of 1 to 1000 GiB).
"""

from __future__ import annotations

import datetime
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib import models
from lib.models import load_model

SMALL_RAM = 10**9  # available_bytes for the memory-guard cases
PICKLE_OK = {"allow_pickle": True}


class Make:
    """Builds bad folders in a test's tmp_path from the two good ones."""

    def __init__(self, tmp: Path, lm_dir: Path, cnn_dir: Path) -> None:
        self.tmp, self.lm_dir, self.cnn_dir = tmp, lm_dir, cnn_dir

    def lm(self, drop: tuple[str, ...] = (), **config) -> Path:
        """The tiny GPT-2 folder with `config` merged into config.json and files matching `drop` removed."""
        return self._copy(self.lm_dir, "lm", drop, config)

    def cnn(self, **config) -> Path:
        return self._copy(self.cnn_dir, "cnn", (), config)

    def _copy(self, source: Path, name: str, drop: tuple[str, ...], config: dict) -> Path:
        folder = self.tmp / name
        shutil.copytree(source, folder)
        for pattern in drop:
            for f in folder.glob(pattern):
                f.unlink()
        if config:
            path = folder / "config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
        return folder

    def pickled(self, obj: object, folder: Path | None = None, name: str = "pytorch_model.bin") -> Path:
        """A folder whose only weights are `obj` written by torch.save."""
        folder = folder or self.lm()
        for f in folder.glob("*.safetensors"):
            f.unlink()
        torch.save(obj, folder / name)
        return folder

    def write(self, folder: Path, name: str, content: bytes | str) -> Path:
        data = content.encode() if isinstance(content, str) else content
        (folder / name).write_bytes(data)
        return folder


def truncated(folder: Path) -> Path:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return folder


def huge_config(folder: Path) -> Path:
    with (folder / "config.json").open("r+b") as f:
        f.truncate(17 * 2**20)  # sparse: nothing is written
    return folder


def renamed_weights(folder: Path) -> Path:
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    return folder


def without_a_tensor(folder: Path) -> Path:
    state = load_file(str(folder / "model.safetensors"))
    del state["stages.head.bias"]
    save_file(state, str(folder / "model.safetensors"))
    return folder


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Make], object]  # -> the spec given to load_model
    error: type[Exception]
    fragment: str
    options: dict | None = None


NOT_JSON = '{"model_type": "gpt2", n_layer: 3}'
LLAMA_8192 = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672,
                  num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)
LLAMA_TINY = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=32, intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, vocab_size=257)

CASES = [
    # names that are not models
    Case("empty name", lambda m: "", models.ModelNotFoundError, "No model given"),
    Case("unknown zoo name", lambda m: "zoo:nope", models.ModelNotFoundError, "no bundled model 'nope'"),
    Case("missing folder", lambda m: "/no/such/folder", models.ModelNotFoundError, "does not exist"),
    Case("not a hub name", lambda m: "not a name!", models.ModelNotFoundError, "not a bundled model"),
    Case("a number", lambda m: 3, models.ModelNotFoundError, "string or a path, not by a int value"),
    Case("a file", lambda m: m.lm() / "config.json", models.NoCheckpointError, "is a file, not a folder"),
    Case("folder without config.json", lambda m: m.lm(drop=("config.json",)), models.NoCheckpointError,
         "holds no config.json"),
    Case("config without weights", lambda m: m.lm(drop=("*.safetensors",)), models.NoCheckpointError,
         "no weights"),
    Case("pickle without the opt-in", lambda m: m.pickled({}), models.PickleRefusedError, "allow_pickle=True"),
    Case("remote code", lambda m: m.lm(auto_map={"AutoModelForCausalLM": "evil.Model"}),
         models.RemoteCodeRefusedError, "trust_remote_code=True"),
    # 1. the memory guard counts what config.json builds
    Case("n_layer 20000", lambda m: m.lm(n_layer=20000), models.ModelTooLargeError,
         "only 0.93 GiB of memory is free", {"available_bytes": SMALL_RAM}),
    Case("n_layer 20000 in memory", lambda m: m.lm(n_layer=20000), models.NoCheckpointError,
         "it has 20000 layers, the file holds 3 layers, so 19997 layers are missing (transformer.h.3.*"),
    Case("llama d 8192 config, GPT-2 weights", lambda m: m.lm(**LLAMA_8192), models.ModelTooLargeError,
         "the model config.json describes takes 2", {"available_bytes": SMALL_RAM}),
    Case("CNN width 100000", lambda m: m.cnn(kwargs={"width": 100000}), models.ModelTooLargeError,
         "GiB as float32", {"available_bytes": SMALL_RAM}),
    # 2. weights that do not match the config
    Case("n_layer 5, 3-layer weights", lambda m: m.lm(n_layer=5), models.NoCheckpointError,
         "24 tensors the model needs are missing (transformer.h.3.attn.c_attn.bias"),
    Case("n_layer 2, 3-layer weights", lambda m: m.lm(n_layer=2), models.NoCheckpointError,
         "11 tensors in the file have no place in the model (transformer.h.2."),
    Case("n_layer 1, 3-layer weights", lambda m: m.lm(n_layer=1), models.NoCheckpointError,
         "22 tensors in the file have no place"),
    Case("n_embd 64, width-32 weights", lambda m: m.lm(n_embd=64), models.NoCheckpointError,
         "tensors have the wrong shape (transformer.h.0.attn.c_attn.bias: file [96], model [192]"),
    Case("untied config, tied weights", lambda m: m.lm(tie_word_embeddings=False), models.NoCheckpointError,
         "1 tensor the model needs is missing (lm_head.weight)"),
    Case("small llama config, GPT-2 weights", lambda m: m.lm(**LLAMA_TINY), models.NoCheckpointError,
         "do not match the model config.json describes"),
    Case("pickled {'hello': 'world'}", lambda m: m.pickled({"hello": "world"}), models.NoCheckpointError,
         "pytorch_model.bin holds the entry 'hello' of type str, not a tensor", PICKLE_OK),
    Case("pickled {'hello': tensor}", lambda m: m.pickled({"hello": torch.zeros(2)}), models.NoCheckpointError,
         "1 tensor in the file has no place in the model (hello)", PICKLE_OK),
    Case("pickled list", lambda m: m.pickled([torch.zeros(2)]), models.NoCheckpointError,
         "pytorch_model.bin holds a list, so it is not a state dict", PICKLE_OK),
    Case("pickled date", lambda m: m.pickled({"w": datetime.date(2020, 1, 1)}), models.NoCheckpointError,
         "Python objects other than tensors", PICKLE_OK),
    Case("CNN width 8, width-4 weights", lambda m: m.cnn(kwargs={"width": 8}), models.NoCheckpointError,
         "stages.conv1.0.bias: file [4], model [8]"),
    Case("CNN weights without head.bias", lambda m: without_a_tensor(m.cnn()), models.NoCheckpointError,
         "1 tensor the model needs is missing (stages.head.bias)"),
    Case("pickled CNN not a state dict", lambda m: m.pickled("weights", m.cnn(), "model.pt"),
         models.NoCheckpointError, "model.pt holds a str", PICKLE_OK),
    # 3. corrupt files, named in words
    Case("config.json not JSON", lambda m: m.write(m.lm(), "config.json", NOT_JSON), models.NoCheckpointError,
         "config.json is not valid JSON: it breaks the JSON rules at line 1, column 24 (expecting property name "
         "enclosed in double quotes)"),
    Case("config.json empty", lambda m: m.write(m.lm(), "config.json", ""), models.NoCheckpointError,
         "config.json is empty"),
    Case("config.json a list", lambda m: m.write(m.lm(), "config.json", "[1, 2]"), models.NoCheckpointError,
         "config.json holds a JSON list, not an object"),
    Case("config.json not text", lambda m: m.write(m.lm(), "config.json", b"\xff\xfe\x00"),
         models.NoCheckpointError, "config.json is not a text file"),
    Case("config.json of 17 MiB", lambda m: huge_config(m.lm()), models.NoCheckpointError,
         "config.json is 17 MiB, far more than any model's settings take"),
    Case("config.json without model_type", lambda m: m.write(m.lm(), "config.json", '{"n_layer": 3}'),
         models.UnsupportedModelError, 'config.json has no "model_type"'),
    Case("unknown model_type", lambda m: m.lm(model_type="gpt7"), models.UnsupportedModelError,
         "config.json names the model type 'gpt7'"),
    Case("n_layer not a number", lambda m: m.lm(n_layer="six"), models.UnsupportedModelError,
         "config.json sets n_layer to 'six', but a count or size must be a whole number of at least 1"),
    Case("n_head does not divide n_embd", lambda m: m.lm(n_head=5), models.UnsupportedModelError,
         "config.json describes a model transformers cannot build"),
    Case("0-byte model.safetensors", lambda m: m.write(m.lm(), "model.safetensors", b""), models.NoCheckpointError,
         "model.safetensors is empty (0 bytes)"),
    Case("garbage model.safetensors", lambda m: m.write(m.lm(), "model.safetensors", b"\x07" * 300),
         models.NoCheckpointError, "model.safetensors is not a valid safetensors file"),
    Case("truncated model.safetensors", lambda m: truncated(m.lm()), models.NoCheckpointError,
         "points outside the file; the file is truncated"),
    Case("weights under another name", lambda m: renamed_weights(m.lm()), models.NoCheckpointError,
         "none under the name transformers reads: model.safetensors"),
    Case("0-byte pickle", lambda m: m.write(m.pickled({}), "pytorch_model.bin", b""), models.NoCheckpointError,
         "pytorch_model.bin is empty (0 bytes)", PICKLE_OK),
    Case("garbage pickle", lambda m: m.write(m.pickled({}), "pytorch_model.bin", b"not a pickle"),
         models.NoCheckpointError, "pytorch_model.bin cannot be read as a PyTorch state dict: it is not a file "
         "written by torch.save", PICKLE_OK),
    Case("CNN unknown architecture", lambda m: m.cnn(layerscope_architecture="resnet"),
         models.UnsupportedModelError, "unknown architecture 'resnet'"),
    Case("CNN architecture not a name", lambda m: m.cnn(layerscope_architecture=["digits-cnn"]),
         models.UnsupportedModelError, "unknown architecture ['digits-cnn']"),
    Case("CNN unknown argument", lambda m: m.cnn(kwargs={"depth": 3}), models.UnsupportedModelError,
         "digits-cnn takes: width, n_classes"),
    Case("CNN kwargs not an object", lambda m: m.cnn(kwargs=[4]), models.UnsupportedModelError,
         '"kwargs" in config.json must be an object'),
    Case("CNN negative width", lambda m: m.cnn(kwargs={"width": -4}), models.UnsupportedModelError,
         "config.json gives digits-cnn arguments it cannot be built with"),
    # issue 9: no tokenizer
    Case("GPT-2 folder without tokenizer", lambda m: m.lm(drop=("tokenizer*",)), models.NoCheckpointError,
         "has no tokenizer: the folder holds none of tokenizer.json, vocab.json + merges.txt"),
    Case("pickled GPT-2 folder without tokenizer", lambda m: m.pickled(lm_state(m), m.lm(drop=("tokenizer*",))),
         models.NoCheckpointError, "tokenizer.save_pretrained(folder)", PICKLE_OK),
    Case("garbage tokenizer.json", lambda m: m.write(m.lm(), "tokenizer.json", "{}"), models.NoCheckpointError,
         "has tokenizer files (tokenizer.json) but they do not give a working tokenizer"),
]


def lm_state(m: Make) -> dict[str, torch.Tensor]:
    return load_file(str(m.lm_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory) -> Path:
    from lib.zoo.nets import DigitsCNN

    folder = tmp_path_factory.mktemp("cnn")
    torch.manual_seed(0)
    models.save_image_model(DigitsCNN(width=4), "digits-cnn", folder, width=4)
    return folder


@pytest.fixture
def make(tmp_path, tiny_gpt2_dir, cnn_dir) -> Make:
    return Make(tmp_path, tiny_gpt2_dir, cnn_dir)


@pytest.fixture
def built(monkeypatch) -> list[str]:
    """Names of the model-building calls made during the test (booting an LM, loading
    weights into a module); each also fails the load."""
    from transformer_lens.model_bridge import TransformerBridge

    calls: list[str] = []

    def spy(name: str) -> Callable:
        def refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")

        return refuse

    monkeypatch.setattr(TransformerBridge, "boot_transformers", spy("boot_transformers"))
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", spy("load_state_dict"))
    return calls


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_folder_is_refused_before_any_model_is_built(case, make, built):
    spec = case.build(make)
    with pytest.raises(case.error) as caught:
        load_model(spec, **(case.options or {}))
    assert case.fragment in str(caught.value)
    assert built == []


def test_the_spies_see_a_good_load(make, built):
    """The check above can fail: good folders do reach the model-building calls."""
    for folder in (make.lm(), make.cnn()):
        with pytest.raises(AssertionError):
            load_model(folder)
    assert built == ["boot_transformers", "load_state_dict"]


def test_pickle_refusal_names_the_opt_in_once(make):
    with pytest.raises(models.PickleRefusedError) as caught:
        load_model(make.pickled({}))
    assert str(caught.value).count("allow_pickle=True") == 1


def test_path_and_string_load_the_same_model(tiny_lm, tiny_gpt2_dir):
    handle = load_model(Path(tiny_gpt2_dir))
    assert handle.spec == str(tiny_gpt2_dir)
    assert handle.fingerprint == tiny_lm.fingerprint


def test_good_pickled_state_dict_loads_like_safetensors(make, tiny_lm):
    """A full `model.state_dict()` (lm_head stored beside the tied wte, as torch.save writes it)."""
    state = lm_state(make)
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    handle = load_model(make.pickled(state), allow_pickle=True)
    assert handle.fingerprint == tiny_lm.fingerprint


def test_good_pickled_cnn_loads_like_safetensors(make, cnn_dir):
    folder = make.pickled(load_file(str(cnn_dir / "model.safetensors")), make.cnn(), "model.pt")
    assert load_model(folder, allow_pickle=True).fingerprint == load_model(cnn_dir).fingerprint


def test_hub_style_gpt2_keys_still_load(make, tiny_lm):
    """GPT-2 as the hub stores it: no `transformer.` prefix, legacy causal-mask buffers
    `h.N.attn.bias` and `h.N.attn.masked_bias`, no lm_head; `from_pretrained` accepts
    all of them, so must we."""
    folder = make.lm()
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(folder / "model.safetensors")).items()}
    for layer in range(3):
        state[f"h.{layer}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(folder / "model.safetensors"))
    assert load_model(folder).fingerprint == tiny_lm.fingerprint


def test_deep_configs_are_sized_without_being_built(make):
    """Above MAX_META_LAYERS the size comes from 1- and 2-layer builds; it equals the
    size of the built model (a stack of identical layers)."""
    from transformers import GPT2Config

    from lib import preflight

    config = GPT2Config(n_layer=preflight.MAX_META_LAYERS + 1, n_embd=32, n_head=4, n_positions=64, vocab_size=257)
    model_class = preflight.hf_model_class(config, "deep")
    size = preflight.hf_config_size(model_class, config, "deep", trust_remote_code=False)
    assert size.model is None and size.layer_prefixes == ("transformer.h.",)
    assert size.bytes == preflight.model_bytes(preflight.meta_hf_model(model_class, config, "deep", False))
