"""Exports that are really compressed: removed blocks leave config and weights, quantized
weights are stored quantized (compressed-tensors, read by plain transformers; LayerScope's
packed codes otherwise), the README says per edit what is realised, and the folder loaded
back reproduces the lab's logits and bits per byte."""

import io
import json
import zipfile

import pytest
import torch

from analysis.compress import export
from analysis.compress.export_check import check_export, folder_bytes
from analysis.compress.lab import Lab
from analysis.compress.prune.pruning import Drop, Magnitude, RemoveHeads, Wanda
from analysis.compress.quant.quantize import Quantize
from analysis.compress.recipe import Recipe, build
from lib import data
from lib.metrics import metrics_from_outputs, model_inputs
from lib.packed import PACKED_FILE, load_packed, pack_bits, unpack_bits

pytest.importorskip("compressed_tensors")  # transformers reads INT8 / INT4 / FP8 checkpoints through it


def unzip(blob: bytes, into):
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        names = archive.namelist()
        archive.extractall(into)
    (top,) = {n.split("/")[0] for n in names}
    return into / top


def plain(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def exported(handle, edits, tmp_path, name="m"):
    """The edited copy and the unzipped folder its export wrote."""
    edited = build(handle, Recipe(handle.fingerprint, list(edits)))
    return edited, unzip(export.model_zip(edited, name, Recipe(handle.fingerprint, list(edits))), tmp_path)


def tiny(family, tmp_path, n_layers=3):
    from lib.models import load_model
    from tools.families import save_tiny

    save_tiny(family, tmp_path / f"{family}-base", n_layers=n_layers)
    return load_model(str(tmp_path / f"{family}-base"))


@pytest.mark.parametrize("bits", [1, 2, 4, 6, 8])
def test_packed_bits_round_trip(bits):
    index = torch.randint(0, 2**bits, (1001,))
    packed = pack_bits(index, bits)
    assert packed.numel() == -(-1001 * bits // 8)  # ceil(n bits / 8) bytes, nothing more
    assert torch.equal(unpack_bits(packed, bits, 1001), index)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_dropping_two_of_three_blocks_shrinks_config_and_file(family, tmp_path):
    base = tiny(family, tmp_path)
    edited, folder = exported(base, [Drop("block", 0), Drop("block", 2)], tmp_path)
    before = json.loads((tmp_path / f"{family}-base" / "config.json").read_text())
    after = json.loads((folder / "config.json").read_text())
    assert after.get("n_layer", after.get("num_hidden_layers")) == 1
    lists = [k for k, v in before.items() if isinstance(v, list) and len(v) == 3 and k != "architectures"]
    assert all(len(after[k]) == 1 for k in lists)  # layer_types and the like stay in step
    if family == "qwen2":
        assert "layer_types" in lists
    full = (tmp_path / f"{family}-base" / "model.safetensors").stat().st_size
    blocks = sum(p.numel() * p.element_size() for n, p in base.plain_model().named_parameters()
                 if ".h.0." in n or ".layers.0." in n)  # one block's bytes
    assert (folder / "model.safetensors").stat().st_size <= full - 2 * blocks + 4096  # + the header's slack
    model = plain(folder)
    tokens = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(model(input_ids=tokens).logits, edited.forward(tokens), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < base.n_params


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-sym", "fp8-e4m3"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_quantized_weights_load_in_plain_transformers_exactly(family, fmt, tmp_path):
    base = tiny(family, tmp_path)
    edited, folder = exported(base, [Drop("block", 1), Quantize(fmt)], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert not (folder / PACKED_FILE).exists()
    model = plain(folder)
    tokens = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(model(input_ids=tokens).logits, edited.forward(tokens), rtol=1e-5, atol=1e-5)
    assert (folder / "model.safetensors").stat().st_size < edited.size_bits / 8 * 1.2 + 4096
    card = (folder / "README.md").read_text()
    assert f"quantize {fmt}" in card and "compressed-tensors" in card and "| storage |" in card


@pytest.mark.parametrize("fmt", ["nf4", "fp6-e3m2", "binary", "fp8-e5m2"])
def test_formats_without_a_plain_reader_are_packed_codes_with_a_loader(fmt, tmp_path):
    base = tiny("llama", tmp_path)
    edited, folder = exported(base, [Quantize(fmt)], tmp_path)
    meta = json.loads(__import__("safetensors").safe_open(str(folder / PACKED_FILE), "pt").metadata()["layerscope"])
    assert meta and all(m["format"] == fmt for m in meta.values())
    tokens = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(load_packed(folder)(input_ids=tokens).logits, edited.forward(tokens),
                               rtol=1e-5, atol=1e-5)
    weights = (folder / "model.safetensors").stat().st_size + (folder / PACKED_FILE).stat().st_size
    assert weights < edited.size_bits / 8 * 1.3 + 8192  # the packed codes take about the lab's bits
    note = (folder / export.NOTE_FILE).read_text()
    assert "load_packed" in note and "load_packed" in (folder / "README.md").read_text()


def test_weights_moved_off_their_grid_stay_float_and_the_card_says_so(tmp_path):
    """Binary weights pruned afterwards within their rows (Wanda) hold zeros, which are on no binary grid."""
    base = tiny("gpt2", tmp_path)
    edited, folder = exported(base, [Quantize("binary", scope="mlp"), Wanda(0.5, scope="mlp")], tmp_path)
    card = (folder / "README.md").read_text()
    assert "Quantized weights kept in float" in card and "not all on one grid" in card
    tokens = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(load_packed(folder)(input_ids=tokens).logits, edited.forward(tokens),
                               rtol=1e-5, atol=1e-5)


def test_card_states_recipe_metrics_sizes_and_what_is_realised(tiny_lm, tmp_path):
    lab = Lab(tiny_lm, data.code_batch(tiny_lm.tokenizer, seq_len=32, n_windows=2), latency_repeats=0)
    for edit in (Drop("block", 0), RemoveHeads(1, (0,)), Drop("mlp", 2), Magnitude(0.3), Quantize("int8")):
        lab.add(edit)
    folder = unzip(export.lab_model_zip(lab), tmp_path)
    card = (folder / "README.md").read_text()
    rows = {line.split(" | ")[1]: line.split(" | ")[2] for line in card.splitlines() if line.startswith("| ")
            and line.split(" | ")[0][2:].isdigit()}
    assert rows == {"drop block 0": "storage and compute", "remove heads 0 of layer 1": "simulated only",
                    "drop mlp 2": "simulated only", Magnitude(0.3).label: "simulated only",
                    Quantize("int8").label: "storage"}
    assert "bits per byte" in card and f"{(folder / 'model.safetensors').stat().st_size:,}" in card


def _code_lm_lab():
    from lib.models import load_model

    base = load_model("zoo:code-lm")
    return base, Lab(base, data.code_batch(base.tokenizer, seq_len=64, n_windows=4), latency_repeats=0)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_code_lm_two_drops_heads_and_quantization_is_small_and_reproduces_the_lab(fmt, tmp_path):
    """The issue's 'done when': files <= 1.2x the lab's size, two fewer layers, plain
    from_pretrained within 1e-3 bits per byte of the lab, fewer parameters than the base."""
    base, lab = _code_lm_lab()
    for edit in (Drop("block", 1), Drop("block", 4), RemoveHeads(2, (1,)), Quantize(fmt)):  # default groups
        lab.add(edit)
    folder = unzip(export.lab_model_zip(lab), tmp_path)
    assert folder_bytes(folder) <= 1.2 * lab.current.metrics.size_bits / 8
    assert json.loads((folder / "config.json").read_text())["n_layer"] == base.structure.n_layers - 2
    model = plain(folder)
    tokens = model_inputs(lab.batch)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    got = metrics_from_outputs(logits, lab.batch, 0, 0, lab.reference)
    assert got.bits_per_byte == pytest.approx(lab.current.metrics.bits_per_byte, abs=1e-3)
    assert sum(p.numel() for p in model.parameters()) < base.n_params


def test_check_export_loads_it_back_and_measures_it(tiny_lm):
    lab = Lab(tiny_lm, data.code_batch(tiny_lm.tokenizer, seq_len=32, n_windows=2), latency_repeats=0)
    lab.add(Drop("block", 1))
    lab.add(Quantize("int4"))
    check = check_export(lab, repeats=1)
    assert check.loader == "plain transformers" and check.n_layers == tiny_lm.structure.n_layers - 1
    assert check.reloaded.bits_per_byte == pytest.approx(lab.current.metrics.bits_per_byte, abs=1e-3)
    assert check.files_bytes < tiny_lm.size_bits / 8  # smaller than the base's weights alone
    table = check.rows("bits_per_byte")
    assert len(table["export, loaded back"]) == len(table[""]) and "MiB on disk" in check.caption("bits_per_byte")
