"""Devices and precision: a bfloat16 checkpoint loads as bfloat16 and every view and lab
edit runs on it, within a stated tolerance of the same checkpoint loaded as float32;
device and precision names are checked; nothing moves a tensor to the CPU in a loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tools.families import save_tiny

FAMILIES = ("gpt2", "llama", "neox")  # learned positions; gated MLP + GQA; parallel block
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 6
# bfloat16 keeps 8 bits of mantissa: a relative step of 2^-8 = 0.4 % per rounding; these tiny
# models' losses and similarities agree with float32 far inside these bounds
REL = 0.01
ABS = 0.01


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """family -> (the bf16 checkpoint loaded as saved, the same file loaded as float32)."""
    from lib.models import load_model

    out = {}
    for family in FAMILIES:
        folder = save_tiny(family, tmp_path_factory.mktemp(family), dtype=torch.bfloat16)
        out[family] = (load_model(str(folder)), load_model(str(folder), dtype="float32"))
    return out


def _batch(handle):
    from lib.data import text_batch

    return text_batch(handle.tokenizer, TEXT, seq_len=24, max_windows=4)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bf16_checkpoint_stays_bf16(family, pairs):
    half, full = pairs[family]
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert half.size_bits * 2 == full.size_bits  # the size shown is what is resident
    assert ("runs on", "cpu · bfloat16") in half.describe()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_view_on_bf16_is_within_tolerance_of_float32(family, pairs):
    from analysis.channels.circuits import circuits, composition_scores
    from analysis.channels.heads import head_roles, role_probe
    from analysis.interpreter import transformer as it
    from analysis.interpreter.gradients import working_copy
    from analysis.redundancy.report import build_report
    from lib.metrics import evaluate

    half, full = pairs[family]
    batch = _batch(half)
    assert evaluate(half, batch).nll == pytest.approx(evaluate(full, batch).nll, rel=REL)
    h, f = build_report(half, batch, skip=2), build_report(full, batch, skip=2)
    for kind in ("block", "attention", "mlp"):
        torch.testing.assert_close(getattr(h.similarity, kind), getattr(f.similarity, kind), rtol=0, atol=ABS)
    for drop, metrics in h.sweep.dropped.items():
        assert metrics.nll == pytest.approx(f.sweep.dropped[drop].nll, rel=REL), drop
    probe = role_probe(half)
    torch.testing.assert_close(head_roles(half, probe).sink, head_roles(full, probe).sink, rtol=0, atol=ABS)
    torch.testing.assert_close(composition_scores(circuits(half)).scores["V"],
                               composition_scores(circuits(full)).scores["V"], rtol=0, atol=ABS)
    tokens, target = it.prompt_tokens(half, "def f(x):"), it.logit_target(half, 50)
    exact = it.token_contributions(working_copy(half), tokens, target)  # float64 copy of the bf16 weights
    assert exact.error < 1e-5
    assert exact.value == pytest.approx(it.token_contributions(working_copy(full), tokens, target).value, abs=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_lab_edit_runs_on_bf16(family, pairs, tmp_path):
    from analysis.compress.exits.rule import EarlyExit
    from analysis.compress.export import model_zip
    from analysis.compress.prune.factorize import LowRank, ShareLayers
    from analysis.compress.prune.pruning import Drop, Magnitude, SkipLayers, Wanda
    from analysis.compress.quant.formats import FORMATS
    from analysis.compress.quant.quantize import LLMInt8, Quantize
    from analysis.compress.recipe import Recipe, build
    from lib.metrics import evaluate

    half, full = pairs[family]
    batch = _batch(half)
    base_half, base_full = half.forward(batch.tokens), full.forward(batch.tokens)
    edits = [Magnitude(0.5), Wanda(0.5), Drop("attention", 1), SkipLayers(1.5), LowRank(rank=4), ShareLayers(0, 1),
             LLMInt8(6.0), EarlyExit("max_prob", 0.5), Quantize("int8", activations=True)]
    for edit in edits + [Quantize(name) for name in FORMATS]:
        edited_half = build(half, Recipe(half.fingerprint, [edit]))
        kl_half = evaluate(edited_half, batch, base_half).kl_to_base
        kl_full = evaluate(build(full, Recipe(full.fingerprint, [edit])), batch, base_full).kl_to_base
        assert kl_half == pytest.approx(kl_full, rel=0.5, abs=1e-3), edit.label  # same edit, same damage
        assert edited_half.dtype == torch.bfloat16 and edited_half.size_bits <= half.size_bits, edit.label
    assert model_zip(build(half, Recipe(half.fingerprint, [Magnitude(0.5)])), "m")


def test_device_and_precision_names(tmp_path):
    from lib import devices
    from lib.errors import ModelLoadError
    from lib.models import load_model

    assert devices.pick_device("auto") in ("cuda", "mps", "cpu") and devices.pick_device("cpu") == "cpu"
    for wrong, words in (("gpu", "A device is one of"), ("float8", "A precision is one of")):
        with pytest.raises(ModelLoadError, match=words):
            load_model("zoo:code-lm", **({"device": wrong} if words.startswith("A device") else {"dtype": wrong}))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="This machine has no CUDA device"):
            load_model("zoo:code-lm", device="cuda")
    assert devices.checkpoint_dtype({"torch_dtype": "bfloat16"}) == torch.bfloat16
    assert devices.checkpoint_dtype({"dtype": "float16"}) == torch.float16
    assert devices.checkpoint_dtype({}) == torch.float32
    half = load_model("zoo:code-lm", dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.forward(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_a_device_map_load_of_a_tiny_model(tmp_path):
    """accelerate's device_map="auto" (how a model larger than one GPU is spread) loads the
    same model; on a machine without a GPU it puts every layer on the CPU."""
    from lib import devices
    from lib.models import _load_bridge, load_model

    folder = save_tiny("llama", tmp_path / "llama", dtype=torch.bfloat16)
    spread = _load_bridge(folder, "tiny", False, devices.Placement("cpu", torch.bfloat16, "auto"))
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(spread.forward(tokens), load_model(str(folder)).forward(tokens))


def test_nothing_moves_a_tensor_to_the_cpu_inside_a_loop():
    """On a GPU a .cpu() / .numpy() in a per-layer loop is a device sync and a copy per
    layer; statistics stay on the model's device until the loop is done."""
    root = Path(__file__).resolve().parents[1]
    allowed = {"lib/storage.py"}  # the weight fingerprint hashes each tensor's bytes on the host, once per model
    found = []
    for path in sorted((root / "analysis").rglob("*.py")) + sorted((root / "lib").glob("*.py")):
        for loop in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.For, ast.While))):
            for node in ast.walk(loop):
                if isinstance(node, ast.Attribute) and node.attr in ("cpu", "numpy") \
                        and str(path.relative_to(root)) not in allowed:
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, found
