"""Early exits: the cost model at both ends of every criterion, the one-pass curve against
the exited model run separately, the blocked readout against a full softmax, the tuned
lens against the logit lens on held-out tokens, exit heads for the CNN, and the checks
every edit gets (base untouched, no hooks left, bad thresholds refused)."""


import pytest
import torch

from analysis.compress import exits
from analysis.compress.edits import from_dict
from analysis.compress.exits.readouts import lens_choices, remember_lens
from analysis.compress.exits.stats import class_blocks, summarise
from analysis.compress.prune.pruning import Drop, Magnitude
from analysis.compress.recipe import Recipe, build
from analysis.lens import LOGIT_LENS, Reader, train_tuned_lens
from lib import data
from lib.errors import RecipeError
from lib.handle import Point
from lib.hooks import count_hooks
from lib.metrics import evaluate, metrics_from_outputs

NEVER = {"max_prob": 1.0, "entropy": 0.0, "saturation": 1.0}  # patience: the number of checks
ALWAYS = {"max_prob": 0.0, "entropy": 5.55, "patience": 0, "saturation": -1.0}  # entropy: above ln 257


@pytest.fixture(scope="module")
def batch(tiny_lm):
    return data.code_batch(tiny_lm.tokenizer, seq_len=32, n_windows=4)


@pytest.fixture(scope="module")
def stats(tiny_lm, batch):
    return exits.collect_exit_stats(tiny_lm, batch)


def edited(base, *edits):
    return build(base, Recipe(base.fingerprint, list(edits)))


def readout_cost(tiny_lm, seq_len=32):
    """Hand count for the tiny GPT-2 (d 32, d_mlp 128, vocab 257): a block is 24 d^2 weight
    FLOPs plus 4 d (T + 1) / 2 for attention; a readout 2 d V."""
    d, vocab, L = 32, 257, tiny_lm.structure.n_layers
    block = 24 * d * d + 4 * d * (seq_len + 1) / 2
    return block, 2 * d * vocab, L * block + 2 * d * vocab


@pytest.mark.parametrize("criterion", exits.CRITERIA)
def test_threshold_no_token_meets_runs_every_layer_and_pays_for_the_checks(tiny_lm, batch, stats, criterion):
    never = NEVER.get(criterion, len(stats.depths))
    score = {"max_prob": stats.max_prob, "entropy": -stats.entropy, "saturation": stats.saturation}.get(criterion)
    assert score is None or score.max() < (-never if criterion == "entropy" else never)  # really never met
    point = exits.exit_at(stats, criterion, never)
    assert (point.exit_depth == tiny_lm.structure.n_layers).all()
    assert point.agreement == 1 and point.early == 0 and point.mean_exit == tiny_lm.structure.n_layers
    block, readout, full = readout_cost(tiny_lm)
    check = 6 * 32 if criterion == "saturation" else readout  # a cosine or a readout at each of K checks
    assert point.saved == point.saved_oracle == pytest.approx(-len(stats.depths) * check / full, rel=1e-12)
    assert point.saved < 0
    model = evaluate(tiny_lm, batch)
    assert point.perplexity == pytest.approx(model.perplexity, rel=1e-5)


@pytest.mark.parametrize("criterion", exits.CRITERIA)
def test_threshold_every_token_meets_exits_at_the_first_checked_layer(tiny_lm, stats, criterion):
    point = exits.exit_at(stats, criterion, ALWAYS[criterion])
    assert stats.depths[0] == 1 and (point.exit_depth == 1).all() and point.early == 1
    block, readout, full = readout_cost(tiny_lm)
    check = readout + (6 * 32 if criterion == "saturation" else 0)  # saturation: a cosine, then the readout
    kv = 4 * 32 * 32 * (tiny_lm.structure.n_layers - 1)  # keys and values of the two skipped blocks
    assert point.saved_oracle == pytest.approx(1 - (block + check) / full, rel=1e-12)
    assert point.saved == pytest.approx(1 - (block + check + kv) / full, rel=1e-12)


def expected_outputs(handle, tokens, exit_depth, lens=LOGIT_LENS):
    """Each token's readout at its exit depth, computed the obvious way."""
    states, logits = handle.exit_states(tokens)
    depth = exit_depth.view(tokens.shape)
    want = logits.clone()
    reader = Reader(handle, lens)
    for d in set(depth.flatten().tolist()) - {handle.structure.n_layers}:
        read = reader.logits(d, states[d].reshape(-1, states[d].shape[-1])).view(want.shape)
        want[depth == d] = read[depth == d]
    return want


@pytest.mark.parametrize("criterion", exits.CRITERIA)
def test_one_pass_curve_equals_running_the_exited_model(tiny_lm, batch, stats, criterion):
    base = tiny_lm.forward(batch.tokens)
    chosen = exits.default_thresholds(stats, criterion)
    chosen = chosen[[len(chosen) // 4, len(chosen) // 2, 3 * len(chosen) // 4]].tolist()
    curve = exits.exit_curve(stats, criterion, torch.tensor(chosen))
    mixed = 0
    for i, t in enumerate(chosen):
        t = int(t) if criterion == "patience" else t
        point = exits.exit_at(stats, criterion, t)
        assert point.agreement == pytest.approx(float(curve.agreement[i]), abs=1e-12)
        model = edited(tiny_lm, exits.EarlyExit(criterion, t))
        out = model.forward(batch.tokens)
        torch.testing.assert_close(out, expected_outputs(tiny_lm, batch.tokens, point.exit_depth),
                                   rtol=1e-5, atol=1e-5)
        measured = metrics_from_outputs(out, batch, 0, 0, base)
        assert measured.agreement == pytest.approx(point.agreement, abs=1e-6)
        assert measured.perplexity == pytest.approx(point.perplexity, rel=1e-5)
        mixed += 0 < point.early < 1
    assert mixed  # the thresholds split the tokens, so the comparison means something


def test_blocked_readout_equals_full_softmax_and_lens_at_last_layer_equals_logits(tiny_lm, batch):
    L = tiny_lm.structure.n_layers
    h_last = tiny_lm.record(batch.tokens, [Point("resid_post", L - 1)])[Point("resid_post", L - 1)]
    h_last = h_last.reshape(-1, h_last.shape[-1])
    logits = tiny_lm.forward(batch.tokens).reshape(-1, 257)
    reader = Reader(tiny_lm, LOGIT_LENS)
    torch.testing.assert_close(reader.logits(L, h_last), logits, rtol=1e-5, atol=1e-5)
    targets = batch.tokens.reshape(-1)
    summary = summarise(class_blocks(reader, L, h_last), h_last.shape[0], targets)
    log_p = torch.log_softmax(logits, -1)
    torch.testing.assert_close(summary.max_prob, log_p.exp().max(-1).values, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(summary.entropy, -(log_p.exp() * log_p).sum(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(summary.logprob, log_p.gather(1, targets[:, None]).squeeze(1), rtol=1e-4, atol=1e-5)
    assert torch.equal(summary.argmax, log_p.argmax(-1))


@pytest.fixture(scope="module")
def tuned(tiny_lm):
    """A tuned lens trained briefly on the training files, kept for the tiny model's edits."""
    lens = train_tuned_lens(tiny_lm, n_tokens=2048, max_steps=30)
    remember_lens(tiny_lm, lens)
    return lens


def test_tuned_lens_lowers_kl_to_the_final_layer_on_held_out_tokens(tiny_lm, batch, tuned):
    assert sorted(tuned.weight) == list(range(tiny_lm.structure.n_layers)) and exits.has_trained(tiny_lm, "tuned")
    logit, tuned = exits.lens_kl(tiny_lm, batch, "logit"), exits.lens_kl(tiny_lm, batch, tuned)
    assert logit.depths == tuned.depths == tuple(range(tiny_lm.structure.n_layers + 1))
    assert (tuned.kl[:-1] < logit.kl[:-1]).all(), (tuned.kl, logit.kl)
    assert tuned.kl[-1] == logit.kl[-1] == 0


def test_tuned_exits_travel_with_copies_and_the_base_is_untouched(tiny_lm, batch, tuned):
    before = tiny_lm.current_fingerprint()
    t = 0.02
    model = edited(tiny_lm, exits.EarlyExit("max_prob", t, "tuned"))
    copy = model.private_copy()
    assert copy.exit_rule is not model.exit_rule and copy.exit_rule.lens.kind == "tuned"
    torch.testing.assert_close(copy.exit_rule.lens.weight[1], model.exit_rule.lens.weight[1])
    torch.testing.assert_close(copy.forward(batch.tokens), model.forward(batch.tokens))
    assert model.exit_rule.lens is tuned
    point = exits.exit_at(exits.collect_exit_stats(tiny_lm, batch, "tuned"), "max_prob", t)
    torch.testing.assert_close(model.forward(batch.tokens),
                               expected_outputs(tiny_lm, batch.tokens, point.exit_depth, model.exit_rule.lens),
                               rtol=1e-5, atol=1e-5)
    assert tiny_lm.exit_rule is None and tiny_lm.current_fingerprint() == before
    assert count_hooks(tiny_lm.model) == 0 and count_hooks(model.model) == 0
    with pytest.raises(RecipeError, match="never on a loaded base model"):
        tiny_lm.set_exit_rule_(model.exit_rule)


def test_recording_an_exited_copy_stops_early_and_leaves_no_hooks(tiny_lm, batch):
    model = edited(tiny_lm, exits.EarlyExit("entropy", 3.0))
    got = model.record(batch.tokens, [Point("resid_pre", 1)])[Point("resid_pre", 1)]
    want = tiny_lm.record(batch.tokens, [Point("resid_pre", 1)])[Point("resid_pre", 1)]
    torch.testing.assert_close(got, want)
    assert count_hooks(model.model) == 0
    out, cache = model.run_with_cache(batch.tokens, [Point("resid_pre", 2)])  # inside hooks: exits still apply
    torch.testing.assert_close(out, model.forward(batch.tokens), rtol=1e-5, atol=1e-5)
    assert count_hooks(model.model) == 0
    assert not any(m._forward_pre_hooks for m in model.plain_model().modules())  # the plain path's catchers went too


def test_exits_stack_with_pruning_and_removed_blocks(tiny_lm, batch):
    pruned = edited(tiny_lm, Magnitude(0.3), exits.EarlyExit("max_prob", 0.02))
    plain = edited(tiny_lm, Magnitude(0.3))
    point = exits.exit_at(exits.collect_exit_stats(plain, batch), "max_prob", 0.02)
    torch.testing.assert_close(pruned.forward(batch.tokens), expected_outputs(plain, batch.tokens, point.exit_depth),
                               rtol=1e-5, atol=1e-5)
    dropped = edited(tiny_lm, Drop("block", 1))
    states, _ = dropped.exit_states(batch.tokens)
    assert len(states) == 3 and torch.equal(states[2], states[1])  # a removed block passes its input on
    point = exits.exit_at(exits.collect_exit_stats(dropped, batch), "entropy", 5.0)
    after = edited(tiny_lm, Drop("block", 1), exits.EarlyExit("entropy", 5.0))
    torch.testing.assert_close(after.forward(batch.tokens), expected_outputs(dropped, batch.tokens, point.exit_depth),
                               rtol=1e-5, atol=1e-5)
    before = edited(tiny_lm, exits.EarlyExit("entropy", 5.0), Drop("block", 1))  # the rule survives the removal
    torch.testing.assert_close(before.forward(batch.tokens), after.forward(batch.tokens))


@pytest.mark.parametrize("edit, message", [
    (lambda: exits.EarlyExit("max_prob", 1.5), r"max_prob threshold lies in \[0, 1\]"),
    (lambda: exits.EarlyExit("entropy", -0.1), "entropy threshold is >= 0 nats"),
    (lambda: exits.EarlyExit("saturation", 2), r"saturation threshold lies in \[-1, 1\]"),
    (lambda: exits.EarlyExit("patience", 1.5), "whole number"),
    (lambda: exits.EarlyExit("confidence", 0.5), "one of max_prob, entropy, patience, saturation"),
    (lambda: exits.EarlyExit("max_prob", True), "is a number"),
    (lambda: exits.EarlyExit("max_prob", 0.5, "probe"), "lens is one of logit, tuned, heads"),
])
def test_bad_thresholds_are_refused_with_a_clear_message(edit, message):
    with pytest.raises(RecipeError, match=message):
        edit()


def test_thresholds_the_model_cannot_take_are_refused(tiny_lm):
    assert exits.threshold_range(tiny_lm, "entropy").high == 5.55  # ln 257 = 5.5491, rounded up
    with pytest.raises(RecipeError, match=r"On this model the entropy threshold lies in \[0, 5.55\]"):
        edited(tiny_lm, exits.EarlyExit("entropy", 6.0))
    with pytest.raises(RecipeError, match=r"patience threshold lies in \[0, 2\]"):
        edited(tiny_lm, exits.EarlyExit("patience", 3))
    with pytest.raises(RecipeError, match="cannot exit through lens 'heads'"):
        edited(tiny_lm, exits.EarlyExit("max_prob", 0.5, "heads"))
    with pytest.raises(RecipeError, match="holds one early exit"):
        edited(tiny_lm, exits.EarlyExit("max_prob", 0.5), exits.EarlyExit("entropy", 1.0))


def test_edit_round_trips_through_json():
    edit = exits.EarlyExit("patience", 2.0, "tuned")
    assert edit.threshold == 2 and isinstance(edit.threshold, int)
    assert from_dict(edit.to_dict()) == edit and exits.EarlyExit("max_prob", 1) == exits.EarlyExit("max_prob", 1.0)
    assert edit.label == "exit when argmax unchanged for 2 checks (tuned lens)"


def test_prompt_exits_name_each_token_and_its_exit(tiny_lm):
    result = exits.prompt_exits(tiny_lm, "def f(x):", "max_prob", 0.02)
    assert result.labels == ["BOS"] + list("def f(x):") and len(result.exit_depth) == len(result.labels)
    assert set(result.exit_depth) <= {1, 2, 3}
    for depth, where, predicted, full, agrees in zip(result.exit_depth, result.where, result.predicted, result.full,
                                                     result.agrees):
        assert where == ("full model" if depth == 3 else f"after block {depth - 1}")
        assert agrees == (predicted == full) and (depth < 3 or agrees)


@pytest.fixture(scope="module")
def cnn():
    from lib.models import load_model

    return load_model("zoo:digits-cnn")


def test_cnn_exit_heads_give_the_same_curve_as_the_exited_model(cnn):
    batch = data.digits_batch(n=120)
    assert lens_choices(cnn) == ("heads",) and exits.exit_depths(cnn) == (1, 2, 4, 7)
    stats = exits.collect_exit_stats(cnn, batch, "heads")
    last = exits.exit_at(stats, "max_prob", 0.0)  # everything exits at the first head: it was trained
    assert last.accuracy > 0.5 and (last.exit_depth == 1).all()
    base = cnn.forward(batch.images)
    for criterion, t in [("max_prob", 0.9), ("entropy", 0.3), ("patience", 1)]:
        point = exits.exit_at(stats, criterion, t)
        out = edited(cnn, exits.EarlyExit(criterion, t, "heads")).forward(batch.images)
        measured = metrics_from_outputs(out, batch, 0, 0, base)
        assert measured.accuracy == pytest.approx(point.accuracy, abs=1e-6)
        assert measured.agreement == pytest.approx(point.agreement, abs=1e-6)
        assert 0 < point.saved < 1
    curve = exits.exit_curve(stats, "saturation")  # only conv2 keeps its input's shape: the one place to exit
    assert set(exits.exit_at(stats, "saturation", -1.0).exit_depth.tolist()) <= {2, cnn.structure.n_layers}
    assert curve.saved.max() < 1


def test_figures_draw_every_criterion_and_token(tiny_lm, stats):
    from analysis.compress.exits import plots as plots_exits

    curves = exits.exit_curves(stats, n=20)
    current = exits.exit_at(stats, "entropy", 3.0)
    fig = plots_exits.tradeoff_curves(curves, "perplexity", current=current)
    assert [t.name for t in fig.data][:4] == [exits.CRITERION_LABELS[c] for c in exits.CRITERIA]
    assert fig.data[-1].name == "current threshold" and fig.data[-1].x[0] == pytest.approx(100 * current.saved)
    tokens = exits.prompt_exits(tiny_lm, "x = 1\n", "entropy", 3.0)
    grid = plots_exits.token_exits(tokens, per_row=4)
    assert len(grid.data[0].z) == 2 and grid.data[0].z[0][:3] == tokens.exit_depth[:3]


def test_best_exit_is_the_largest_saving_within_the_agreement_bound(tiny_lm, stats):
    best = exits.best_exit(tiny_lm, stats, max_loss=0.2)
    feasible = [(float(p.saved), c, float(t)) for c in exits.CRITERIA for t in exits.threshold_grid(tiny_lm, c)
                for p in [exits.exit_at(stats, c, float(t))] if p.agreement >= 0.8 and p.saved > 0]
    if not feasible:
        assert best is None
        return
    assert best.saved == pytest.approx(max(feasible)[0]) and best.agreement >= 0.8
    assert best.threshold in exits.threshold_grid(tiny_lm, best.criterion).tolist()  # a value the slider holds
    strict = exits.best_exit(tiny_lm, stats, max_loss=0.0)
    assert strict is None or strict.saved <= best.saved


def test_threshold_grid_holds_the_sliders_values(tiny_lm):
    assert exits.threshold_grid(tiny_lm, "max_prob")[83].item() == 0.83
    assert exits.threshold_grid(tiny_lm, "patience").tolist() == list(range(len(exits.exit_depths(tiny_lm)) + 1))
    assert len(exits.threshold_grid(tiny_lm, "saturation")) == 2001
