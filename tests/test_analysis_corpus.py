"""Bad arguments to the analyses: each gets a clear LayerScopeError (never a plausible
result for a typo), and the base model is untouched with no hook left afterwards."""

import pytest
import torch

from analysis.compress.prune.pruning import Drop
from analysis.redundancy import drops as layer_drop
from analysis.redundancy import report as rr
from analysis.redundancy import similarity as redundancy
from lib import data
from lib.errors import AnalysisError, LayerScopeError, RecipeError
from lib.hooks import count_hooks


@pytest.fixture(scope="module")
def batch(tiny_lm):
    return data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=4)


@pytest.fixture(scope="module")
def other_batch(tiny_lm):
    return data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=3)


@pytest.fixture(scope="module")
def report(tiny_lm, batch):
    return rr.build_report(tiny_lm, batch, skip=2)


CASES = [
    ("granularity typo", lambda h, b, o, r: rr.candidates(r, "Blocks", "similarity"), AnalysisError, "Granularity"),
    ("ranking typo", lambda h, b, o, r: rr.candidates(r, "blocks", "similarty"), AnalysisError, "Rank by"),
    ("skip as text", lambda h, b, o, r: redundancy.collect_residuals(h, b, "4"), AnalysisError, "whole number"),
    ("skip as float", lambda h, b, o, r: redundancy.collect_residuals(h, b, 1.5), AnalysisError, "whole number"),
    ("skip as bool", lambda h, b, o, r: redundancy.collect_residuals(h, b, True), AnalysisError, "whole number"),
    ("negative skip", lambda h, b, o, r: redundancy.collect_residuals(h, b, -1), AnalysisError, "whole number"),
    ("part kind typo", lambda h, b, o, r: layer_drop.lm_drop_sweep(h, b, redundancy.collect_residuals(h, b),
                                                                   kinds=("blok",)), AnalysisError, "'blok'"),
    ("residuals of another batch",
     lambda h, b, o, r: layer_drop.lm_drop_sweep(h, b, redundancy.collect_residuals(h, o)),
     AnalysisError, "another batch"),
    ("report of another batch", lambda h, b, o, r: rr.check_drops(h, o, r, [Drop("block", 0)]),
     AnalysisError, "another evaluation batch"),
    ("part beyond the model", lambda h, b, o, r: rr.check_drops(h, b, r, [Drop("block", 7)]),
     RecipeError, "not a part of this 3-layer model"),
    ("stage of an LM", lambda h, b, o, r: rr.check_drops(h, b, r, [Drop("stage", "conv1")]),
     RecipeError, "'stage' is not one"),
    ("no parts", lambda h, b, o, r: rr.check_drops(h, b, r, []), AnalysisError, "at least one"),
    ("image batch for an LM", lambda h, b, o, r: rr.build_report(h, data.digits_batch(n=4)),
     LayerScopeError, "language model"),
]


@pytest.mark.parametrize("call, error, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_analysis_arguments(tiny_lm, batch, other_batch, report, call, error, fragment):
    before = tiny_lm.current_fingerprint()
    with pytest.raises(error, match=fragment):
        call(tiny_lm, batch, other_batch, report)
    assert tiny_lm.current_fingerprint() == before == tiny_lm.fingerprint
    assert count_hooks(tiny_lm.model) == 0


def test_duplicate_drops_count_once(tiny_lm, batch, report):
    once = rr.check_drops(tiny_lm, batch, report, [Drop("mlp", 1)])
    twice = rr.check_drops(tiny_lm, batch, report, [Drop("mlp", 1), Drop("mlp", 1)])
    assert twice.modules == [Drop("mlp", 1)]
    assert twice.predicted == once.predicted and twice.measured == pytest.approx(once.measured, abs=1e-9)
    assert abs(twice.predicted - twice.measured) < 1e-5  # one drop: the sum of one single cost


def test_attention_only_model_has_no_mlp_drops(tmp_path):
    """An attention-only model (MLP weights exactly zero) offers no MLP to drop."""
    from lib.models import load_model

    from conftest import save_tiny_gpt2

    save_tiny_gpt2(tmp_path, n_layer=2)
    folder_handle = load_model(str(tmp_path))
    with torch.no_grad():
        for name, w in folder_handle.weights().items():
            if ".mlp." in name:
                w.zero_()
    from lib.lm_handle import BridgeHandle

    handle = BridgeHandle("attn-only", folder_handle.model)
    assert handle.structure.d_mlp == 0 and ("d_mlp", "128") not in handle.describe()
    report = rr.build_report(handle, data.code_batch(handle.tokenizer, seq_len=24, n_windows=2), skip=2)
    assert {m.kind for m in report.sweep.dropped} == {"block", "attention"}
    assert set(report.sweep.not_droppable) == {Drop("mlp", 0), Drop("mlp", 1)}
    assert all(m.kind == "attention" for m in rr.candidates(report, "sublayers", "similarity"))
    assert set(report.similarity.importance()) == {"block", "attention"}
    assert "no MLPs" in rr.similarity_sentence(report.similarity)
