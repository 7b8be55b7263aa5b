"""The Redundancy report in parts: one pass recorded at skip 0 serves every skip, and
the page reruns only the parts that depend on what changed."""

from collections import Counter

import pytest
import torch

from analysis import lens as lens_module
from analysis.redundancy import report as rr
from analysis.redundancy import similarity as redundancy
from lib import data
from ui import cache, progress
from ui import redundancy as views
from ui.session import load_base
from ui.store import TensorStore

from apptest_helpers import load, new_app, run


def test_one_pass_at_skip_0_gives_the_statistics_of_every_skip(tiny_lm):
    batch = data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=3)
    res = rr.residual_pass(tiny_lm, batch)
    assert res.skip == 0
    for skip in (0, 3):
        direct = redundancy.collect_residuals(tiny_lm, batch, skip)
        sim, expected = rr.layer_statistics(tiny_lm, batch, res, skip), redundancy.layer_similarity(direct)
        assert sim.skip == skip and sim.n_tokens == 3 * (24 - skip)
        for field in ("block", "attention", "mlp", "angular", "cka", "norms", "relative_update"):
            assert torch.equal(getattr(sim, field), getattr(expected, field)), field
        lens, expected_lens = rr.lens_statistics(tiny_lm, batch, res, skip), lens_module.logit_lens(tiny_lm, direct)
        for field in ("kl", "agreement", "entropy"):
            assert torch.equal(getattr(lens, field), getattr(expected_lens, field)), field
    report = rr.build_report(tiny_lm, batch, skip=3)
    assert torch.equal(report.similarity.cka, rr.layer_statistics(tiny_lm, batch, res, 3).cka)


@pytest.mark.parametrize("shared", [True, False], ids=["pass shared with the baseline", "pass of its own"])
def test_changing_skip_reruns_only_the_statistics_and_the_lens(tiny_gpt2_dir, monkeypatch, shared):
    """The residual pass is the base forward's where it fits `SHARED_PASS_BYTES` (the Model
    page recorded it), else the page's own, run once; either way the same statistics."""
    calls = Counter()

    def counted(name):
        original = getattr(rr, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in ("residual_pass", "layer_statistics", "lens_statistics", "drop_sweep"):
        monkeypatch.setattr(rr, name, counted(name))
    store = TensorStore()
    monkeypatch.setattr(views, "STORE", store)  # nothing cached by earlier tests
    monkeypatch.setattr(cache, "STORE", store)
    monkeypatch.setattr(progress, "STORE", store)  # where views.stored keeps the parts
    if not shared:
        monkeypatch.setattr(cache, "SHARED_PASS_BYTES", 0)
    at = load(run(new_app()), str(tiny_gpt2_dir), typed=True)
    run(at, "views/redundancy.py")
    once = {"layer_statistics": 1, "lens_statistics": 1, "drop_sweep": 1}
    if not shared:
        once["residual_pass"] = 1
    assert calls == once
    at.number_input[0].set_value(2)
    run(at)
    assert calls == dict(once, layer_statistics=2, lens_statistics=2)
    handle = load_base(at.session_state["load_request"])
    statistics = store.get(("layer_statistics", *cache.batch_key(handle), 2))
    assert statistics.skip == 2  # what the page now shows
    batch = cache.eval_batch(handle)
    assert torch.equal(statistics.cka, redundancy.layer_similarity(redundancy.collect_residuals(handle, batch, 2)).cka)
    assert not [e.value for e in at.error]
