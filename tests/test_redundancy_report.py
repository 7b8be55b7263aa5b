"""The Redundancy view's report: ranking, predicted vs measured, derived sentences."""

import pytest
import torch

from analysis.compress.prune.pruning import Drop
from analysis.redundancy import report as rr
from lib import data


@pytest.fixture(scope="module")
def batch(tiny_lm):
    return data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=4)


@pytest.fixture(scope="module")
def report(tiny_lm, batch):
    return rr.build_report(tiny_lm, batch, skip=2)


def test_rankings_are_sorted(report):
    sub = rr.candidates(report, "sublayers", "similarity")
    assert len(sub) == 6 and {m.kind for m in sub} == {"attention", "mlp"}
    imp = report.similarity.importance()
    scores = [float(imp[m.kind][m.layer]) for m in sub]
    assert scores == sorted(scores)
    measured = rr.candidates(report, "blocks", "measured")
    costs = [rr.cost(report, m) for m in measured]
    assert costs == sorted(costs) and {m.kind for m in measured} == {"block"}


def test_one_drop_measured_equals_the_sweep(tiny_lm, batch, report):
    """The hook-based drop and the cached-prefix sweep are two routes to one number."""
    from analysis.redundancy import drops as layer_drop

    base = tiny_lm.forward(batch.tokens)
    for module in (Drop("attention", 1), Drop("block", 2)):
        hooked = layer_drop.evaluate_dropped(tiny_lm, batch, [module], base)
        assert abs(hooked.bits_per_byte - report.sweep.dropped[module].bits_per_byte) < 1e-5
        check = rr.check_drops(tiny_lm, batch, report, [module], base)  # one module: the sweep's number, no rerun
        assert check.together == report.sweep.dropped[module] and check.measured == pytest.approx(check.predicted)


def test_two_drops_predicted_is_the_sum(tiny_lm, batch, report):
    mods = [Drop("mlp", 0), Drop("attention", 2)]
    check = rr.check_drops(tiny_lm, batch, report, mods, tiny_lm.forward(batch.tokens))
    assert check.predicted == pytest.approx(sum(report.sweep.delta(m, "bits_per_byte") for m in mods))
    assert check.together.kl_to_base > 0


def test_sentences_quote_the_numbers(report):
    kind, layer, score = report.similarity.joint_ranking()[0]
    assert f"{score:.3g}" in rr.similarity_sentence(report.similarity)
    assert f"{report.sweep.base.bits_per_byte:.4g}" in rr.drop_sentence(report)
    assert f"{float(report.similarity.cka[0, -1]):.3f}" in rr.cka_sentence(report.similarity.cka)


def test_cka_sentence_names_stages_like_the_axes():
    cka = torch.tensor([[1.0, 0.9, 0.2], [0.9, 1.0, 0.5], [0.2, 0.5, 1.0]])
    sentence = rr.cka_sentence(cka, ["input", "conv1", "fc"], "stages")
    assert "between stages conv1 and fc" in sentence and "0.500" in sentence and "0.200" in sentence
    assert "between depths 1 and 2" in rr.cka_sentence(cka)


def test_lens_sentence_never_counts_the_output_as_an_early_depth():
    from types import SimpleNamespace

    late = SimpleNamespace(agreement=torch.tensor([0.1, 0.3, 1.0]), kl=torch.tensor([2.0, 1.0, 0.0]))
    assert "only at the output" in rr.lens_sentence(late)  # depth 2 of a 2-layer model is the output
    early = SimpleNamespace(agreement=torch.tensor([0.1, 0.6, 1.0]), kl=torch.tensor([2.0, 1.0, 0.0]))
    assert "from depth 1 on" in rr.lens_sentence(early)
