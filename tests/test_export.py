"""Export from the lab: zipped checkpoints that load back with the same metrics (LayerScope
and plain transformers), recipe files in and out, history CSV, the offline HTML report,
safe file names."""

import io
import json
import zipfile

import pytest
import torch

from analysis.compress import export
from analysis.compress.lab import Lab
from analysis.compress.prune.pruning import Drop, Magnitude, RemoveHeads, Wanda
from lib import data
from lib.errors import RecipeError
from lib.metrics import metrics_from_outputs, model_inputs
from lib.models import load_model

QUALITY = ("bits_per_byte", "perplexity", "accuracy", "kl_to_base", "agreement")


def lm_lab(handle):
    return Lab(handle, data.code_batch(handle.tokenizer, seq_len=48, n_windows=3), latency_repeats=0)


def unzip(blob: bytes, into):
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        names = archive.namelist()
        archive.extractall(into)
    top = {n.split("/")[0] for n in names}
    assert len(top) == 1, names  # one checkpoint folder
    return into / top.pop(), names


def same_quality(lab, loaded):
    """The loaded model's metrics on the lab's batch equal the lab's current ones."""
    outputs = loaded.forward(model_inputs(lab.batch))
    got = metrics_from_outputs(outputs, lab.batch, loaded.n_params, loaded.size_bits, lab.reference)
    for name in QUALITY:
        want = getattr(lab.current.metrics, name)
        assert (getattr(got, name) is None) == (want is None), name
        if want is not None:
            assert getattr(got, name) == pytest.approx(want, rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("spec, expected", [
    ("gpt2", "gpt2"),
    ("zoo:code-lm", "zoo_code-lm"),
    ("/tmp/x/../y", "tmp_x_y"),
    ("EleutherAI/pythia-70m", "EleutherAI_pythia-70m"),
    ("..", "model"),
    ("C:\\models\\my model?.v2", "C_models_my_model_.v2"),
    (".hidden", "hidden"),
])
def test_safe_names(spec, expected):
    assert export.safe_name(spec) == expected


def test_file_names_say_model_recipe_and_content(tiny_lm):
    lab = lm_lab(tiny_lm)
    assert export.file_name(lab, "recipe", "json") == f"{export.safe_name(tiny_lm.spec)}-base-recipe.json"
    lab.add(Magnitude(0.3))
    name = export.file_name(lab, "model", "zip")
    assert name.endswith(f"-{lab.current.digest}-model.zip") and "/" not in name


def test_lm_export_loads_back_with_the_same_metrics_and_logits(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    lab = lm_lab(tiny_lm)
    for edit in (Magnitude(0.3), RemoveHeads(1, (0, 2)), Drop("mlp", 2), Drop("block", 0)):
        lab.add(edit)
    folder, names = unzip(export.lab_model_zip(lab), tmp_path)
    assert f"{folder.name}/config.json" in names and f"{folder.name}/layerscope-recipe.json" in names
    assert any(n.endswith(".safetensors") for n in names)
    same_quality(lab, load_model(str(folder)))
    plain = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokens = model_inputs(lab.batch)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=tokens).logits, lab.edited().forward(tokens),
                                   rtol=1e-5, atol=1e-5)
    saved = json.loads((folder / "layerscope-recipe.json").read_text())
    assert saved["fingerprint"] == tiny_lm.fingerprint and len(saved["edits"]) == 4


@pytest.mark.slow
def test_code_lm_export_loads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    base = load_model("zoo:code-lm")
    lab = lm_lab(base)
    lab.add(Wanda(0.4, "mlp"))
    lab.add(RemoveHeads(2, (1,)))
    folder, _ = unzip(export.lab_model_zip(lab), tmp_path)
    same_quality(lab, load_model(str(folder)))
    plain = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokens = model_inputs(lab.batch)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=tokens).logits, lab.edited().forward(tokens),
                                   rtol=1e-5, atol=1e-5)


def test_cnn_export_loads_back_with_the_same_accuracy(tmp_path):
    base = load_model("zoo:digits-cnn")
    lab = Lab(base, latency_repeats=0)
    lab.add(Magnitude(0.6))
    lab.add(Drop("stage", "conv2"))
    folder, _ = unzip(export.lab_model_zip(lab), tmp_path)
    loaded = load_model(str(folder))
    same_quality(lab, loaded)
    assert loaded.n_params == lab.current.metrics.n_params  # the bypassed stage stays gone


def test_base_export_has_no_recipe_file(tiny_lm, tmp_path):
    lab = lm_lab(tiny_lm)
    folder, names = unzip(export.lab_model_zip(lab), tmp_path)
    assert not any(n.endswith("layerscope-recipe.json") for n in names)
    assert load_model(str(folder)).fingerprint == tiny_lm.fingerprint


def test_recipe_file_reapplies_with_the_same_metrics(tiny_lm):
    lab = lm_lab(tiny_lm)
    lab.add(Wanda(0.5, "attention"))
    lab.add(Drop("attention", 1))
    text = lab.recipe.to_json()
    other = lm_lab(tiny_lm)  # another session
    point = other.apply(export.read_recipe(text.encode(), tiny_lm))
    assert point.edits == lab.current.edits and point.digest == lab.current.digest
    for name in QUALITY + ("n_params", "size_bits"):
        want = getattr(lab.current.metrics, name)
        assert getattr(point.metrics, name) == (None if want is None else pytest.approx(want, rel=1e-6)), name


@pytest.mark.parametrize("text, message", [
    (b"\xff\xfe{", "not UTF-8"),
    ("{edits: [", "not valid JSON"),
    ('{"fingerprint": "FP", "edits": [], "author": "me"}', r"no field\(s\) author"),
    ('{"fingerprint": "FP", "edits": [{"type": "magnitude", "sparsity": 0.5, "colour": 1}]}', "no field.*colour"),
    ('{"fingerprint": "FP", "edits": [{"type": "magnitude", "sparsity": "half"}]}', r"fraction in \[0, 1\)"),
    ('{"fingerprint": "FP", "edits": [{"type": "magnitude", "sparsity": 1.0}]}', r"fraction in \[0, 1\)"),
    ('{"fingerprint": "FP", "edits": [{"type": "remove_heads", "layer": 0, "heads": 3}]}', "distinct head"),
    ('{"fingerprint": 7, "edits": []}', "fingerprint"),
    ('{"fingerprint": "0123456789abcdef", "model": "gpt2", "edits": []}', r"another model \(gpt2\)"),
])
def test_bad_recipe_files_are_refused_with_a_reason(tiny_lm, text, message):
    if isinstance(text, str):
        text = text.replace('"FP"', json.dumps(tiny_lm.fingerprint))
    with pytest.raises(RecipeError, match=message):
        export.read_recipe(text, tiny_lm)


def test_html_report_is_self_contained(tiny_lm):
    lab = lm_lab(tiny_lm)
    lab.add(Magnitude(0.5))
    lab.add(RemoveHeads(0, (1,)))
    page = export.html_report(lab)
    assert page.startswith("<!DOCTYPE html>") and "<script src=" not in page  # nothing fetched when opened
    assert page.count('class="plotly-graph-div"') == 5  # two history charts, sparsity, heads, internals
    assert page.count("plotly.js v") == 1  # the library itself, inlined once
    assert "<td>bits per byte</td>" in page and "remove heads 1 of layer 0" in page
    assert '"type": "remove_heads"' in page.replace("&quot;", '"')
