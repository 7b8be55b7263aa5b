"""The compression lab: prefix reuse, exact undo/redo/reset, history, Pareto frontier,
per-layer summary, bad input leaving the recipe unchanged."""

import csv
import io
import json

import pytest

from analysis.compress import edits as edit_registry
from analysis.compress import plots as plots_lab
from analysis.compress.history import LabPoint, pareto_front, quality_metric
from analysis.compress.lab import Lab
from analysis.compress.prune.pruning import Drop, Magnitude, RemoveHeads, Wanda
from analysis.compress.recipe import Recipe, build
from lib import data
from lib.errors import RecipeError
from lib.handle import ModelHandle
from lib.metrics import Metrics


@pytest.fixture
def lab(tiny_lm):
    """A fresh lab on the read-only tiny GPT-2 (3 layers, 4 heads), on a small batch."""
    batch = data.code_batch(tiny_lm.tokenizer, seq_len=32, n_windows=4)
    return Lab(tiny_lm, batch, latency_repeats=0)


@pytest.fixture(scope="module")
def cnn():
    from lib.models import load_model

    return load_model("zoo:digits-cnn")


@pytest.fixture
def counted(monkeypatch):
    """Counts of edits applied and private copies made while the test runs."""
    calls = {"apply_": 0, "private_copy": 0}
    real_apply, real_copy = edit_registry.apply_, ModelHandle.private_copy

    def apply_(handle, edit, progress=None):
        calls["apply_"] += 1
        return real_apply(handle, edit, progress)

    def private_copy(self, *args, **kwargs):
        calls["private_copy"] += 1
        return real_copy(self, *args, **kwargs)

    monkeypatch.setattr(edit_registry, "apply_", apply_)
    monkeypatch.setattr(ModelHandle, "private_copy", private_copy)
    return calls


def test_base_point_is_the_base_against_itself(lab, tiny_lm):
    m = lab.current.metrics
    assert lab.current.step == 0 and lab.current.edits == () and lab.recipe.edits == []
    assert m.kl_to_base == pytest.approx(0, abs=1e-6) and m.agreement == 1.0
    assert m.n_params == tiny_lm.n_params and m.size_bits == tiny_lm.size_bits and m.latency_ms > 0
    assert lab.edited() is tiny_lm  # an empty recipe copies nothing
    assert lab.quality == "bits_per_byte"


def test_prefix_reuse_applies_only_the_edits_after_the_cached_prefix(lab, counted, tiny_lm):
    lab.add(Magnitude(0.5))
    assert counted == {"apply_": 1, "private_copy": 1}
    lab.add(RemoveHeads(1, (0,)))  # copies the pruned model, applies one edit
    assert counted == {"apply_": 2, "private_copy": 2}
    lab.replace(1, RemoveHeads(1, (0, 2)))  # the slider moved on the last edit: same prefix
    assert counted == {"apply_": 3, "private_copy": 3}
    lab.add(Drop("mlp", 2))
    assert counted == {"apply_": 4, "private_copy": 4}
    lab.remove(0)  # the first edit went: no prefix left, rebuilt from the base
    assert counted == {"apply_": 6, "private_copy": 5}
    lab.undo()  # back to a recipe tried before: its copy is still cached, nothing is rebuilt
    assert counted == {"apply_": 6, "private_copy": 5}
    assert lab.edited() is lab.model_for(lab.current.edits)
    assert counted == {"apply_": 6, "private_copy": 5}
    expected = build(tiny_lm, lab.recipe)  # the reused copies hold what a build from scratch holds
    assert lab.edited().current_fingerprint() == expected.fingerprint


def test_undo_redo_reset_are_exact_recipe_states_with_identical_weights(lab, tiny_lm):
    first = Magnitude(0.3, "mlp")
    lab.add(first)
    fp_first = lab.edited().fingerprint
    lab.add(Wanda(0.4, "attention"))
    fp_both = lab.edited().fingerprint
    assert fp_both != fp_first
    lab.clear_cache()  # undo must rebuild from the base and land on the same bits
    lab.undo()
    assert lab.recipe.edits == [first] and lab.can_redo
    assert lab.edited().current_fingerprint() == fp_first
    lab.clear_cache()
    lab.redo()
    assert len(lab.recipe.edits) == 2 and not lab.can_redo
    assert lab.edited().current_fingerprint() == fp_both
    lab.reset()
    assert lab.recipe.edits == [] and lab.current.step == 0
    assert lab.edited().current_fingerprint() == tiny_lm.fingerprint
    lab.undo()  # reset is a step like any other
    assert len(lab.recipe.edits) == 2
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint  # the base was never touched
    assert len(lab.history) == 3  # base, one edit, two edits: going back adds no row


def test_new_change_after_undo_clears_redo(lab):
    lab.add(Magnitude(0.2))
    lab.undo()
    lab.add(Magnitude(0.4))
    assert not lab.can_redo
    with pytest.raises(RecipeError, match="nothing to redo"):
        lab.redo()
    lab.undo()  # the undone 20% is not on the stack any more: one step back is all there is
    assert lab.recipe.edits == [] and not lab.can_undo
    with pytest.raises(RecipeError, match="nothing to undo"):
        lab.undo()


def test_history_rows_and_csv(lab, tiny_lm):
    lab.add(Magnitude(0.5))
    lab.add(Drop("block", 1))
    lab.restore(1)
    rows = lab.rows()
    assert [r["step"] for r in rows] == [0, 1, 2] and [r["current"] for r in rows] == [False, True, False]
    assert rows[2]["label"] == "magnitude 50% (all, per layer) + drop block 1"
    assert rows[0]["params_kept"] == 1.0 and rows[2]["params_kept"] < 1.0
    parsed = list(csv.DictReader(io.StringIO(lab.history_csv())))
    assert len(parsed) == 3 and parsed[1]["edits"] == "1" and parsed[0]["accuracy"] == ""
    assert float(parsed[2]["bits_per_byte"]) == pytest.approx(lab.history[2].metrics.bits_per_byte)
    again = Recipe.from_dict({"fingerprint": tiny_lm.fingerprint, "edits": json.loads(parsed[2]["recipe"])})
    assert tuple(again.edits) == lab.history[2].edits  # the recipe column rebuilds the recipe


def test_pareto_front_on_hand_made_points():
    costs = [10, 8, 8, 6, 4, 4, 2]
    bpb = [1.0, 1.1, 1.05, 1.3, 1.2, 1.6, 2.0]  # lower is better
    # 8/1.1 is beaten by 8/1.05; 6/1.3 by 4/1.2; 4/1.6 by 4/1.2
    assert pareto_front(costs, bpb, higher_better=False) == [6, 4, 2, 0]
    acc = [0.9, 0.8, 0.85, 0.7, 0.75, 0.6, 0.5]  # the same ranking, higher is better
    assert pareto_front(costs, acc, higher_better=True) == [6, 4, 2, 0]
    assert pareto_front(costs, bpb, higher_better=True) == [6]  # if higher were better, 2/2.0 beats all
    assert pareto_front([1, 1], [0.5, 0.5], False) == [0, 1]  # equal points dominate neither


def test_frontier_of_the_history_is_in_steps(lab):
    for sparsity in (0.2, 0.5):
        lab.add(Magnitude(sparsity))
        lab.reset()
    lab.add(Drop("block", 2))
    front = lab.frontier("size_bits")
    point = {p.step: (p.metrics.size_bits, p.metrics.bits_per_byte) for p in lab.history}
    assert [p.step for p in lab.history] == [0, 1, 2, 3]  # going back to the base added no row
    assert front[0] == 3  # the only smaller model (pruned weights are still stored)
    assert [point[s][0] for s in front] == sorted(point[s][0] for s in front)
    for step in set(point) - set(front):  # everything off the frontier is beaten by a point on it
        assert any(point[f][0] <= point[step][0] and point[f][1] <= point[step][1] for f in front)
    with pytest.raises(RecipeError, match="latency_ms"):
        lab.frontier("flops")


def test_layer_summary_counts_zeros_heads_and_removed_parts(lab):
    lab.add(Magnitude(0.5, "mlp"))
    lab.add(RemoveHeads(1, (0, 3)))
    lab.add(Drop("attention", 2))
    s = lab.layer_summary()
    by_name = dict(zip(s.names, zip(s.sparsity, s.kept, s.removed)))
    assert by_name["blocks.0.mlp.in"] == (0.5, 0.5, False)
    assert by_name["blocks.0.attn.o"] == (0.0, 1.0, False)
    assert by_name["blocks.1.attn.qkv"] == (0.0, 0.5, False)  # two of four heads' rows are gone
    assert by_name["blocks.2.attn.qkv"] == (1.0, 0.0, True)
    assert s.heads_kept == (4, 2, 0) and s.n_heads == 4
    assert s.removed_parts == ("heads 0, 3 of layer 1", "attention 2")
    figures = [plots_lab.sparsity_bars(s), plots_lab.heads_bars(s)]
    kept, removed = figures[0].data
    assert list(removed.x) == ["blocks.2.attn.qkv", "blocks.2.attn.o"] and list(removed.text) == ["removed"] * 2
    assert len(kept.x) == len(s.names) - 2
    assert list(figures[1].data[0].y) == [4, 2, 0]


def test_deltas_and_metrics_of_an_edited_point(lab):
    lab.add(Drop("mlp", 0))
    d = lab.deltas()
    base, now = lab.base_point.metrics, lab.current.metrics
    assert d["n_params"] == now.n_params - base.n_params < 0
    assert d["kl_to_base"] == now.kl_to_base > 0 and "accuracy" not in d


@pytest.mark.parametrize("make, message", [
    (lambda: Magnitude(1.0), r"fraction in \[0, 1\)"),
    (lambda: Magnitude(-0.1), r"fraction in \[0, 1\)"),
    (lambda: RemoveHeads(0, (7,)), r"no head\(s\) \[7\]"),
    (lambda: RemoveHeads(5, (0,)), "layers 0..2"),
    (lambda: Drop("stage", "conv2"), "parts are"),
])
def test_bad_edits_leave_the_recipe_and_history_unchanged(lab, make, message):
    lab.add(Magnitude(0.2))
    before, history = lab.recipe, list(lab.history)
    with pytest.raises(RecipeError, match=message):
        lab.add(make())
    assert lab.recipe == before and lab.history == history and lab.current.step == 1


def test_an_edit_that_fails_inside_becomes_a_message(lab):
    lab.add(Drop("block", 1))
    with pytest.raises(RecipeError, match="attention of layer 1 is already removed"):
        lab.add(RemoveHeads(1, (0,)))  # heads of a removed block
    assert lab.recipe.edits == [Drop("block", 1)]


def test_duplicates_and_other_models_recipes_are_refused(lab, cnn):
    lab.add(Magnitude(0.2))
    with pytest.raises(RecipeError, match="already in the recipe"):
        lab.add(Magnitude(0.2))
    with pytest.raises(RecipeError, match="made for another model"):
        lab.apply(Recipe(cnn.fingerprint, [Magnitude(0.2)], model="zoo:digits-cnn"))
    with pytest.raises(RecipeError, match="no entry 9"):
        lab.restore(9)
    assert len(lab.recipe.edits) == 1


def test_lab_on_the_digits_cnn(cnn):
    lab = Lab(cnn, latency_repeats=0)
    assert lab.quality == "accuracy"
    lab.add(Magnitude(0.5, "layers", ("conv2", "fc1")))
    lab.add(Drop("stage", "conv2"))
    s = lab.layer_summary()
    assert s.heads_kept is None and s.names == ("conv1", "conv2", "conv3", "fc1", "head")
    assert s.removed == (False, True, False, False, False) and s.sparsity[3] == 0.5
    assert lab.current.metrics.accuracy is not None and lab.current.metrics.n_params < cnn.n_params
    assert cnn.current_fingerprint() == cnn.fingerprint
    alone = Lab(cnn, latency_repeats=0)  # before any edit: one point, axes that make sense for it
    fig = plots_lab.history_scatter(alone.history, "size_bits", alone.quality, alone.frontier(), 0)
    assert fig.layout.xaxis.rangemode == "tozero" and tuple(fig.layout.yaxis.range) == (0, 1.04)


def test_quality_metric_by_kind():
    assert quality_metric(Metrics(1, 1, bits_per_byte=1.0, perplexity=3.0)) == "bits_per_byte"
    assert quality_metric(Metrics(1, 1, accuracy=0.9, perplexity=30.0)) == "accuracy"
    assert quality_metric(Metrics(1, 1, psnr_db=20.0)) == "psnr_db"


def test_history_figure_marks_frontier_and_current(lab):
    lab.add(Magnitude(0.5))
    lab.add(Drop("block", 0))
    fig = plots_lab.history_scatter(lab.history, "size_bits", lab.quality, lab.frontier(), lab.current.step)
    tried, front, base, current = fig.data
    assert list(tried.customdata) == [0, 1, 2] and list(current.customdata) == [2] and list(base.customdata) == [0]
    assert list(front.customdata) == lab.frontier()
    assert isinstance(lab.history[0], LabPoint)


def test_cache_keeps_at_most_its_entries_and_bytes(tiny_lm, counted):
    batch = data.code_batch(tiny_lm.tokenizer, seq_len=32, n_windows=2)
    lab = Lab(tiny_lm, batch, latency_repeats=0, cache_size=2)
    for sparsity in (0.1, 0.2, 0.3):
        lab.reset()
        lab.add(Magnitude(sparsity))
    lab.model_for([Magnitude(0.3)])
    lab.model_for([Magnitude(0.2)])
    assert counted["private_copy"] == 3  # the last two are still cached
    lab.model_for([Magnitude(0.1)])
    assert counted["private_copy"] == 4  # the oldest was evicted
    small = Lab(tiny_lm, batch, latency_repeats=0, cache_bytes=1)  # room for the newest copy only
    small.add(Magnitude(0.1))
    small.add(Magnitude(0.2))
    small.model_for([Magnitude(0.1), Magnitude(0.2)])
    assert counted["private_copy"] == 6
    small.model_for([Magnitude(0.1)])
    assert counted["private_copy"] == 7


def test_an_early_exit_step_is_measured_with_the_compute_it_saves(lab):
    from analysis.compress.exits import EarlyExit, collect_exit_stats, exit_at
    from analysis.compress.export import export_note, history_table

    lab.add(Magnitude(0.3))
    assert lab.current.exits is None
    lab.add(EarlyExit("patience", 0))  # every token exits at the first check
    point, model = lab.current, lab.edited()
    expected = exit_at(collect_exit_stats(model, lab.batch, model.exit_rule.lens), "patience", 0)
    assert point.exits.saved == expected.saved > 0 and point.exits.mean_exit == 1
    assert point.metrics.agreement < lab.history[1].metrics.agreement  # the forward exits, so the metrics move
    rows = lab.rows()
    assert rows[1]["compute_saved"] is None and rows[2]["compute_saved"] == expected.saved
    again = Recipe.from_json(lab.recipe.to_json())
    assert again.edits == lab.recipe.edits and lab.apply(again).step == point.step  # same recipe, same point
    assert "does not exit early" in export_note(model) and export_note(lab.model_for(point.edits[:1])) == ""
    assert f"<td>{point.exits.saved:.1%}</td>" in history_table(lab)
    pruned = lab.model_for(point.edits[:1])  # the same weights without the rule: another function, fingerprint
    assert model.fingerprint != pruned.fingerprint and model.fingerprint == model.current_fingerprint()


def test_latency_is_timed_against_the_base_with_a_flop_prediction(tiny_lm, cnn):
    batch = data.code_batch(tiny_lm.tokenizer, seq_len=32, n_windows=4)
    lab = Lab(tiny_lm, batch, latency_repeats=6)
    base = lab.base_point.latency
    assert base.ratio == base.low == base.high == base.predicted == 1 and not base.measurable
    assert base.base.runs >= 6 and base.base.rows == 4 and lab.base_point.cost("latency_ms") == 1
    pruned = lab.add(Magnitude(0.5)).latency
    assert pruned.predicted == 1.0  # zeros are multiplied as before: the same compute, exactly
    assert pruned.model.runs == pruned.base.runs >= 6 and pruned.low <= pruned.ratio <= pruned.high
    dropped = lab.add(Drop("block", 1)).latency
    assert 0.5 < dropped.predicted < 1  # one block of three gone; the readout stays
    assert lab.current.cost("latency_ms") == dropped.ratio
    rows = lab.rows()
    assert rows[-1]["flops_ratio"] == dropped.predicted and rows[0]["latency_ratio"] == 1
    figure = plots_lab.history_scatter(lab.history, "latency_ms", lab.quality, lab.frontier("latency_ms"), 2)
    assert figure.layout.xaxis.title.text == "latency relative to the base"
    assert list(figure.data[0].x) == [p.latency.ratio for p in lab.history] and figure.data[0].error_x.array
    low, high = lab.history[1].spread.intervals[lab.quality]  # quality bars: each point's bootstrap interval
    value = getattr(lab.history[1].metrics, lab.quality)
    assert figure.data[0].error_y.array[1] == pytest.approx(high - value)
    assert figure.data[0].error_y.arrayminus[1] == pytest.approx(value - low) and low <= value <= high

    image_lab = Lab(cnn, latency_repeats=6)
    assert image_lab.add(Drop("stage", "conv2")).latency.predicted < 1


def test_a_slow_model_is_timed_on_fewer_rows(tiny_lm, monkeypatch):
    from lib import latency

    monkeypatch.setattr(latency, "LATENCY_BUDGET_SECONDS", 0.0)  # nothing fits: one row
    assert latency.timed_rows(1.0, 16, 12) == 1 and latency.timed_rows(0.0, 16, 12) == 16
    batch = data.code_batch(tiny_lm.tokenizer, seq_len=32, n_windows=4)
    lab = Lab(tiny_lm, batch, latency_repeats=6)
    assert lab.base_point.latency.base.rows == 1 and lab.add(Magnitude(0.5)).latency.model.rows == 1


def test_a_lab_given_the_base_outputs_does_not_run_the_whole_batch_again(tiny_lm, monkeypatch):
    from lib import latency, metrics
    from lib.scoring import prepare_base

    batch = data.code_batch(tiny_lm.tokenizer, seq_len=32, n_windows=4)
    alone = Lab(tiny_lm, batch, latency_repeats=6)
    outputs = tiny_lm.outputs(metrics.model_inputs(batch))
    monkeypatch.setattr(latency, "LATENCY_BUDGET_SECONDS", 0.0)  # a slow model: only its fewest rows are timed
    rows = []
    for method in ("forward", "outputs"):
        original = getattr(type(tiny_lm), method)
        monkeypatch.setattr(type(tiny_lm), method, lambda self, x, _f=original: (rows.append(len(x)), _f(self, x))[1])
    given = Lab(tiny_lm, batch, latency_repeats=6, base_outputs=prepare_base(outputs, batch))
    assert set(rows) == {1} and given.base_point.latency.base.rows == 1, rows  # one row paces, one row is timed
    for name in metrics.QUALITY_FIELDS:
        assert getattr(given.base_point.metrics, name) == getattr(alone.base_point.metrics, name), name


def test_time_again_replaces_only_the_current_points_latency(tiny_lm):
    batch = data.code_batch(tiny_lm.tokenizer, seq_len=32, n_windows=4)
    lab = Lab(tiny_lm, batch, latency_repeats=6)
    with pytest.raises(RecipeError, match="Only an edited model"):
        lab.time_again()  # the base is the reference itself
    before = lab.add(Magnitude(0.5))
    again = lab.time_again()
    assert again.step == before.step and len(lab.history) == 2 and lab.current is again
    assert again.latency is not before.latency and again.latency.predicted == 1.0
    assert again.metrics.latency_ms == again.latency.model.median_ms
    assert again.metrics.bits_per_byte == before.metrics.bits_per_byte and again.edits == before.edits


def test_an_edited_copy_holds_only_what_its_edits_rewrote(tiny_lm):
    """Copies share every tensor with the base until an edit writes it (copy-on-write):
    a drop rewrites nothing, a head removal one layer's storage, and the base is untouched."""
    from lib.storage import owned_bytes

    def owned(model):
        return owned_bytes(iter(model.weights().values()))

    total = sum(t.numel() * t.element_size() for t in tiny_lm.weights().values())
    tokens = data.code_batch(tiny_lm.tokenizer, seq_len=16, n_windows=2).tokens
    lab = Lab(tiny_lm, data.code_batch(tiny_lm.tokenizer, seq_len=16, n_windows=2), latency_repeats=0)
    copy = tiny_lm.private_copy()
    copy.forward(tokens), tiny_lm.forward(tokens)
    assert owned(copy) == 0
    lab.add(Drop("block", 1))
    assert owned(lab.edited()) == 0
    lab.add(RemoveHeads(0, (1,)))
    assert 0 < owned(lab.edited()) < total / 3
    lab.add(Magnitude(0.5))
    pruned = sum(w.numel() * w.element_size() for name, w in lab.edited().linear_layers().items()
                 if name.startswith("blocks."))  # the tied unembedding is not pruned
    assert pruned <= owned(lab.edited()) < total
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint
    again = Lab(tiny_lm, lab.batch, latency_repeats=0).base_point.metrics
    assert (again.nll, again.kl_to_base) == (lab.base_point.metrics.nll, 0.0)


def test_large_logits_read_out_as_scored_give_the_same_lab_numbers(tiny_lm, monkeypatch):
    import lib.lm_handle
    from lib.scoring import ReadLogits

    batch = data.code_batch(tiny_lm.tokenizer, seq_len=32, n_windows=3)
    held = Lab(tiny_lm, batch, latency_repeats=0)
    monkeypatch.setattr(lib.lm_handle, "HELD_LOGITS_BYTES", 0)
    read = Lab(tiny_lm, batch, latency_repeats=0)
    assert isinstance(read.reference.logits, ReadLogits)
    for edit in (Magnitude(0.3), Drop("block", 2)):
        a, b = held.add(edit).metrics, read.add(edit).metrics
        for name in ("nll", "kl_to_base", "agreement", "bits_per_byte"):
            assert getattr(b, name) == pytest.approx(getattr(a, name), rel=1e-5, abs=1e-7), name
