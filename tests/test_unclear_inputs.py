"""Inputs that used to reach the user as a raw TypeError, IndexError, KeyError,
RuntimeError, RecursionError, SafetensorError or OSError: each is now a LayerScopeError
that says what was wrong and what to do, or, where the input is fine, a correct result."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch

from lib import errors
from lib.models import load_model

# ---- checkpoint folders ------------------------------------------------------------------------


def _copy(tiny_gpt2_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, folder)
    return folder


def _config(**settings: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(settings)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _deep_config(folder: Path) -> None:
    depth = 10**5
    (folder / "config.json").write_text('{"model_type": "gpt2", "x": ' + "[" * depth + "]" * depth + "}")


def _header(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite model.safetensors' header with `change` applied, data untouched."""

    def edit(folder: Path) -> None:
        path = folder / "model.safetensors"
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        change(header)
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])

    return edit


def _tensors(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _unknown_dtype(header: dict) -> None:
    header[_tensors(header)[0]]["dtype"] = "Q7"


def _overlap(header: dict) -> None:
    first, second = _tensors(header)[:2]
    begin, end = header[second]["data_offsets"]
    header[second]["data_offsets"] = [0, end - begin]  # on top of the first tensor


def _bad_metadata(header: dict) -> None:
    header["__metadata__"] = {"format": 1}  # the reader wants strings


def _replace_weights(how: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        name = "config.json" if how.startswith("config") else "model.safetensors"
        (folder / name).unlink()
        if how.endswith("dir"):
            (folder / name).mkdir()
        else:
            os.symlink(folder / "gone", folder / name)

    return edit


def _index(weight_map: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    return edit


FOLDER_CASES = {
    "model_type a list": (_config(model_type=["gpt2"]), errors.UnsupportedModelError,
                          'gives "model_type" as [\'gpt2\']; it must be one name in quotes'),
    "model_type an object": (_config(model_type={"name": "gpt2"}), errors.UnsupportedModelError,
                             "it must be one name in quotes"),
    "config nested 10^5 deep": (_deep_config, errors.NoCheckpointError, "nests lists or objects too deeply"),
    "architectures of another family": (_config(architectures=["LlamaForCausalLM"]), errors.UnsupportedModelError,
                                        "lists the architecture 'LlamaForCausalLM', which belongs to model type "
                                        "'llama'"),
    "n_head -4": (_config(n_head=-4), errors.UnsupportedModelError, "sets n_head to -4, but a count or size must be"),
    "n_head 0": (_config(n_head=0), errors.UnsupportedModelError, "sets n_head to 0"),
    "n_head 4.5": (_config(n_head=4.5), errors.UnsupportedModelError, "sets n_head to 4.5"),
    "n_embd as text": (_config(n_embd="32"), errors.UnsupportedModelError, "sets n_embd to '32'"),
    "n_layer true": (_config(n_layer=True), errors.UnsupportedModelError, "sets n_layer to True"),
    "vocab_size 0": (_config(vocab_size=0), errors.UnsupportedModelError, "sets vocab_size to 0"),
    "unknown safetensors dtype": (_header(_unknown_dtype), errors.NoCheckpointError,
                                  "has the dtype 'Q7', which is none of the safetensors dtypes"),
    "overlapping offsets": (_header(_overlap), errors.NoCheckpointError, "overlaps the tensor before it"),
    "metadata the reader rejects": (_header(_bad_metadata), errors.NoCheckpointError,
                                    "the safetensors reader says"),
    "weights a folder": (_replace_weights("weights dir"), errors.NoCheckpointError,
                         "model.safetensors is a folder, not a regular file"),
    "weights a dangling link": (_replace_weights("weights link"), errors.NoCheckpointError,
                                "model.safetensors is a link to a file that does not exist"),
    "config a folder": (_replace_weights("config dir"), errors.NoCheckpointError,
                        "config.json is a folder, not a regular file"),
    "config a dangling link": (_replace_weights("config link"), errors.NoCheckpointError,
                               "config.json is a link to a file that does not exist"),
    "weight_map a number": (_index(5), errors.NoCheckpointError, 'is not a valid shard index (a JSON object with a '
                                                                 '"weight_map"'),
    "weight_map empty": (_index({}), errors.NoCheckpointError, 'lists no shards (its "weight_map" is empty)'),
    "weight_map numeric files": (_index({"wte": 3}), errors.NoCheckpointError, "is not a valid shard index"),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_broken_folders_are_refused_in_words(case, tiny_gpt2_dir, tmp_path):
    edit, kind, words = FOLDER_CASES[case]
    folder = _copy(tiny_gpt2_dir, tmp_path)
    edit(folder)
    with pytest.raises(kind) as caught:
        load_model(str(folder))
    assert words in str(caught.value)
    assert "Save the model again" in str(caught.value) or "Copy the file" in str(caught.value) \
        or "Fix that setting" in str(caught.value) or "Use the config.json" in str(caught.value)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode")
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_unreadable_files_are_refused_in_words(name, tiny_gpt2_dir, tmp_path):
    folder = _copy(tiny_gpt2_dir, tmp_path)
    (folder / name).chmod(0)
    try:
        with pytest.raises(errors.NoCheckpointError, match=f"{name} cannot be read: .* no permission"):
            load_model(str(folder))
    finally:
        (folder / name).chmod(0o644)


def test_a_file_without_read_permission_is_named(tiny_gpt2_dir, tmp_path, monkeypatch):
    """The same refusal under root, where chmod does not stop reads: the permission check is told no."""
    folder = _copy(tiny_gpt2_dir, tmp_path)
    blocked = (folder / "model.safetensors").resolve()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != blocked and real_access(p, mode, **kw))
    with pytest.raises(errors.NoCheckpointError, match="model.safetensors cannot be read: .* chmod a\\+r"):
        load_model(str(folder))


def test_architectures_as_a_string_of_the_same_family_loads(tiny_gpt2_dir, tmp_path, tiny_lm):
    """Not every odd config is wrong: a bare class name of the right family loads the same model."""
    folder = _copy(tiny_gpt2_dir, tmp_path)
    _config(architectures="GPT2LMHeadModel")(folder)
    tokens = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(load_model(str(folder)).forward(tokens), tiny_lm.forward(tokens))


# ---- running -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(6, 1, 8, 8)


def test_token_ids_past_the_vocabulary_are_refused(tiny_lm):
    with pytest.raises(errors.DataError, match=r"must lie in 0 \.\.\. 256 \(this model's vocabulary has 257"):
        tiny_lm.forward(torch.tensor([[1, 2, 257]]))
    with pytest.raises(errors.DataError, match="ids from -1 to 3"):
        tiny_lm.forward(torch.tensor([[-1, 3]]))
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint


def test_tokens_past_the_context_are_refused(tiny_lm):
    n_ctx = tiny_lm.structure.n_ctx
    with pytest.raises(errors.DataError, match=f"has {n_ctx + 1} tokens per row, but this model reads at most {n_ctx}"):
        tiny_lm.forward(torch.zeros(1, n_ctx + 1, dtype=torch.long))
    assert tiny_lm.forward(torch.zeros(1, n_ctx, dtype=torch.long)).shape == (1, n_ctx, 257)  # the limit itself runs
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint


def test_float_token_ids_are_refused(tiny_lm):
    with pytest.raises(errors.DataError, match="reads token ids: an integer tensor"):
        tiny_lm.forward(torch.zeros(1, 4))
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint


def test_pattern_records_check_tokens_too(tiny_lm):
    from lib.handle import Point

    with pytest.raises(errors.DataError, match="vocabulary has 257"):
        tiny_lm.record(torch.tensor([[1, 900]]), [Point("pattern", 0)])
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool])
def test_copies_are_only_made_in_floating_dtypes(tiny_lm, tiny_cnn, dtype):
    for handle in (tiny_lm, tiny_cnn):
        with pytest.raises(errors.RecipeError, match=f"only be made in a floating-point dtype .* not {dtype}"):
            handle.private_copy(dtype=dtype)
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_images_in_other_float_dtypes_are_converted(tiny_cnn, images, dtype):
    from analysis.compress.prune.allocation import distortion_curves
    from analysis.compress.quant.calibration import compare_methods

    converted = images.to(dtype).float()  # what the model sees: the same values, rounded once
    assert torch.equal(tiny_cnn.forward(images.to(dtype)), tiny_cnn.forward(converted))
    curves = distortion_curves(tiny_cnn, images.to(dtype), n_levels=3)
    expected = distortion_curves(tiny_cnn, converted, 3)
    assert torch.equal(curves.distortion, expected.distortion)
    layer = next(iter(tiny_cnn.linear_layers()))
    methods = compare_methods(tiny_cnn, images.to(dtype), "int8", [layer])
    assert methods == compare_methods(tiny_cnn, converted, "int8", [layer])
    assert tiny_cnn.current_fingerprint() == tiny_cnn.fingerprint


def test_integer_images_are_refused(tiny_cnn):
    with pytest.raises(errors.DataError, match="reads floating-point images .* not a torch.uint8 tensor"):
        tiny_cnn.forward(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


# ---- analysis arguments ------------------------------------------------------------------------


@pytest.mark.parametrize("n_levels", [0, 1, -3, 2.5])
def test_distortion_curves_need_two_levels(tiny_lm, n_levels):
    from analysis.compress.prune.allocation import distortion_curves

    with pytest.raises(errors.AnalysisError, match=f"n_levels to be a whole number from 2 .* to 1,000, not {n_levels}"):
        distortion_curves(tiny_lm, torch.tensor([[1, 2, 3]]), n_levels=n_levels)
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint


@pytest.mark.parametrize("bins", [0, -1, 2.5])
def test_histograms_need_a_bin(tiny_lm, bins):
    from analysis.compress.quant.quantize import layer_histogram

    layer = next(iter(tiny_lm.linear_layers()))
    with pytest.raises(errors.RecipeError, match=f"bins to be a whole number of at least 1, not {bins}"):
        layer_histogram(tiny_lm, layer, "int8", bins=bins)
    assert layer_histogram(tiny_lm, layer, "int8", bins=1).counts == (tiny_lm.linear_layers()[layer].numel(),)
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint


def test_compare_methods_names_an_unknown_layer(tiny_lm):
    from analysis.compress.quant.calibration import compare_methods

    with pytest.raises(errors.RecipeError, match="no linear layer 'blocks.9.mlp.in'; its layers are blocks.0"):
        compare_methods(tiny_lm, torch.tensor([[1, 2, 3]]), "int8", ["blocks.0.mlp.in", "blocks.9.mlp.in"])
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint
