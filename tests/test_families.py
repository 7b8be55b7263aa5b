"""The family matrix (forward and views): a tiny random-weight checkpoint of every family
in `tools.families`, loaded through the user's loader, checked against plain
transformers with plain torch hooks (`tests/family_refs.py`) value by value."""

from __future__ import annotations

import family_refs as ref
import pytest
import torch

from tools.families import FAMILIES

FAMILY_NAMES = list(FAMILIES)
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 6


def _batch(handle):
    from lib.data import text_batch

    return text_batch(handle.tokenizer, TEXT, seq_len=24, max_windows=4)


def _close(a, b, tol=2e-5):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_forward_and_every_block_run_alone_match_plain_transformers(family, family_handles, plain_models):
    from lib.handle import Point
    from lib.metrics import evaluate, metrics_from_outputs

    handle, plain = family_handles[family], plain_models[family]
    batch = _batch(handle)
    tokens = batch.tokens
    logits = handle.forward(tokens)
    _close(logits, ref.logits(plain, tokens))
    want = metrics_from_outputs(ref.logits(plain, tokens), batch, handle.n_params, handle.size_bits)
    assert evaluate(handle, batch).nll == pytest.approx(want.nll, rel=1e-5)
    L = handle.structure.n_layers
    resid = handle.record(tokens, [Point("resid_pre", 0)])[Point("resid_pre", 0)]
    for layer in range(L):
        resid = handle.blocks.run(layer, resid)
    _close(handle.blocks.readout(resid), logits)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_single_drop_of_the_fast_sweep_matches_a_plain_hook(family, family_handles, plain_models):
    from analysis.redundancy.drops import lm_drop_sweep
    from analysis.redundancy.similarity import collect_residuals
    from lib.metrics import metrics_from_outputs
    from lib.scoring import prepare_base

    handle, plain = family_handles[family], plain_models[family]
    batch = _batch(handle)
    sweep = lm_drop_sweep(handle, batch, collect_residuals(handle, batch))
    base = ref.logits(plain, batch.tokens)
    reference = prepare_base(base, batch)
    assert not sweep.not_droppable and len(sweep.dropped) == 3 * handle.structure.n_layers
    for drop, got in sweep.dropped.items():
        cut = ref.logits(plain, batch.tokens, [(drop.kind, drop.layer)])
        want = metrics_from_outputs(cut, batch, handle.n_params, handle.size_bits, reference)
        assert got.nll == pytest.approx(want.nll, rel=1e-4, abs=1e-6), drop
        assert got.kl_to_base == pytest.approx(want.kl_to_base, rel=1e-3, abs=1e-6), drop
        assert (cut - base).abs().max() > 1e-3  # every drop changes the logits: the check can fail


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_redundancy_report_and_sublayer_similarities(family, family_handles, plain_models):
    from analysis.redundancy.report import build_report

    handle, plain = family_handles[family], plain_models[family]
    batch = _batch(handle)
    report = build_report(handle, batch, skip=2)
    sim = report.similarity
    tokens = batch.tokens
    layers = ref.decoder_layers(plain)
    seen: dict[str, list] = {"in": [], "attn": [], "out": []}
    hooks = [layer.register_forward_hook(
        lambda m, a, k, out: seen["in"].append(a[0] if a else k["hidden_states"]) or
        seen["out"].append(out[0] if isinstance(out, tuple) else out), with_kwargs=True) for layer in layers]
    hooks += [ref.attention(layer).register_forward_hook(lambda m, a, out: seen["attn"].append(out[0]))
              for layer in layers]
    with torch.no_grad():
        plain(input_ids=tokens)
    for h in hooks:
        h.remove()

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a[:, 2:].double(), b[:, 2:].double(), dim=-1).mean()

    for l in range(handle.structure.n_layers):
        x, a, y = seen["in"][l], seen["attn"][l], seen["out"][l]
        m = x + a
        mlp_want = cos(x, x + (y - m)) if handle.structure.parallel else cos(m, y)  # METHODS: parallel blocks
        assert float(sim.attention[l]) == pytest.approx(float(cos(x, m)), abs=1e-5)
        assert float(sim.mlp[l]) == pytest.approx(float(mlp_want), abs=1e-5)
        assert float(sim.block[l]) == pytest.approx(float(cos(x, y)), abs=1e-5)
    assert handle.structure.parallel == (family in ("neox", "phi"))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_linearisation_is_complete_and_its_value_is_the_real_logit(family, family_handles, family_dirs):
    from analysis.interpreter import transformer as it
    from analysis.interpreter.gradients import working_copy

    handle = family_handles[family]
    tokens = it.prompt_tokens(handle, "def f(x): return x")
    result = it.token_contributions(working_copy(handle), tokens, it.logit_target(handle, 50, versus=51))
    real = ref.logits(ref.plain_model(family_dirs[family], torch.float64), tokens)[0, -1]
    assert result.value == pytest.approx(float(real[50] - real[51]), abs=1e-6)
    assert result.error < 1e-5 and abs(float(result.contributions.sum()) + result.bias - result.value) < 1e-5
    assert result.has_positions == (family in ("gpt2", "opt"))  # learned positions
    kinds = dict(result.frozen)
    gated = family in ("llama", "qwen2", "mistral", "gemma")
    assert ("gated-MLP gate branches act(x·W_gate)" in kinds) == gated


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_head_roles_circuits_and_head_cuts(family, family_handles, plain_models):
    from analysis.channels.circuits import channel_components, circuits, composition_scores
    from analysis.channels.heads import HeadEdit, attention_patterns, editing, head_roles, role_probe

    handle, plain = family_handles[family], plain_models[family]
    probe = role_probe(handle)
    roles = head_roles(handle, probe)
    assert roles.induction.shape == (handle.structure.n_layers, handle.structure.n_heads)
    with torch.no_grad():
        want = plain(input_ids=probe[:1], output_attentions=True).attentions
    _close(attention_patterns(handle, probe), torch.stack([p[0] for p in want]))

    c = circuits(handle)
    comp = composition_scores(c)
    for scores in comp.scores.values():
        assert torch.isfinite(scores).all() and scores.min() >= 0 and scores.max() <= 1 + 1e-6
    parts = channel_components(c, comp, (0, 1), (1, 2), "V")
    assert parts.full == pytest.approx(float(comp.scores["V"][0, 1, 1, 2]), rel=1e-4)

    tokens = _batch(handle).tokens
    with editing(handle, c, [HeadEdit(1, 2)]):
        got = handle.forward(tokens)
    _close(got, ref.logits(plain, tokens, heads=[(1, 2)]))
    _close(handle.forward(tokens), ref.logits(plain, tokens))  # the hooks are gone


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_head_circuits_read_without_a_copy_equal_transformer_lens_compatibility_mode(family, family_handles):
    """`heads.circuits()` folds the first norm's scale (random here, so folding shows) into
    W_Q, W_K, W_V and centres as TransformerLens does, from the attention weights alone."""
    copy = family_handles[family].private_copy()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in copy.model.blocks:
            block.ln1.weight.copy_(torch.rand(block.ln1.weight.shape, generator=gen) + 0.5)
    copy.weights_changed()
    from analysis.channels.circuits import circuits

    got, reference = circuits(copy), copy.heads.circuit_model()  # got: a layer at a time, K and V repeated
    want = {"W_Q": reference.QK.A, "W_K": reference.QK.B.transpose(-2, -1), "W_V": reference.OV.A,
            "W_O": reference.OV.B}
    for name, tensor in want.items():
        torch.testing.assert_close(getattr(got, name), tensor.detach().float(), rtol=1e-5, atol=1e-6)
    raw = torch.stack([block.attn.W_Q.detach().float() for block in copy.model.blocks])
    assert not torch.allclose(got.W_Q, raw)  # the fold changed something, so the check could fail


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_residuals_recorded_through_the_plain_model_equal_the_bridge_hooks(family, family_handles):
    """Residual-stream points alone are recorded from the plain model by torch hooks
    (`lib.lm_records`): the same tensors the bridge's hook points give."""
    from lib.handle import ModelHandle, Point

    handle = family_handles[family]
    L = handle.structure.n_layers
    sites = ("resid_pre",) if handle.structure.parallel else ("resid_pre", "resid_mid")
    points = [Point(site, layer) for layer in range(L) for site in sites] + [Point("resid_post", L - 1)]
    tokens = _batch(handle).tokens[:2, :24]
    fast, bridge = handle.record(tokens, points), ModelHandle.record(handle, tokens, points)
    assert fast.keys() == bridge.keys() == set(points)
    for point in points:
        _close(fast[point], bridge[point])


@pytest.mark.parametrize("held", [True, False], ids=["held logits", "read out"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_one_forward_gives_the_outputs_and_the_residual_pass(family, held, family_handles, monkeypatch):
    """The baseline's forward records the residual stream on the side (`outputs_with_residuals`):
    its outputs are exactly `outputs`' (the hooks only read), its states exactly the residual
    pass's, and no hook is left behind. Where a forward cannot record (inside user hooks, a
    copy with a block removed, a parallel block's m_l), it says so (None) and runs nothing."""
    import lib.lm_handle
    from analysis.compress.edits import apply_
    from analysis.compress.prune.pruning import Drop
    from analysis.redundancy.report import residual_pass
    from analysis.redundancy.similarity import outputs_with_residuals
    from lib.handle import Point
    from lib.hooks import count_hooks
    from lib.scoring import ReadLogits, rows_of

    if not held:
        monkeypatch.setattr(lib.lm_handle, "HELD_LOGITS_BYTES", 0)
    handle = family_handles[family]
    batch = _batch(handle)
    def hooks_on_plain() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in handle.plain_model().modules())

    before = hooks_on_plain()
    got = outputs_with_residuals(handle, batch)
    assert hooks_on_plain() == before
    if handle.structure.parallel or count_hooks(handle.model):  # m_l is h_l + attention's write, or
        assert got is None  # the bridge keeps hooks of its own (OPT): the forward runs through it, recording nothing
        return
    outputs, res = got
    expected, pass_ = handle.outputs(batch.tokens), residual_pass(handle, batch)
    assert isinstance(outputs, ReadLogits) == isinstance(expected, ReadLogits) == (not held)
    for window in range(len(batch.tokens)):
        assert torch.equal(rows_of(outputs, window, 0, 24), rows_of(expected, window, 0, 24))
    assert torch.equal(res.resid, pass_.resid) and torch.equal(res.mid, pass_.mid) and res.logits is None
    assert res.batch_digest == batch.digest and res.skip == 0
    with handle.hooks([(Point("resid_pre", 0), lambda t: None)]):
        assert outputs_with_residuals(handle, batch) is None
    dropped = handle.private_copy()
    apply_(dropped, Drop("block", 1))
    assert outputs_with_residuals(dropped, batch) is None


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_large_logits_are_read_out_as_they_are_scored_and_equal_the_forward(family, family_handles, monkeypatch):
    """`outputs` gives logits that would be large as a `ReadLogits` over the plain model's
    final hidden state: every row equals the forward's, on the base, on a copy with a block
    dropped (structural) and on one whose linear layers' inputs are quantized (pre-hooks)."""
    import lib.lm_handle
    from analysis.compress.edits import apply_
    from analysis.compress.prune.pruning import Drop
    from analysis.compress.quant.quantize import Quantize
    from lib.scoring import ReadLogits, rows_of

    monkeypatch.setattr(lib.lm_handle, "HELD_LOGITS_BYTES", 0)
    handle = family_handles[family]
    tokens = _batch(handle).tokens[:2, :24]
    dropped, w8a8 = handle.private_copy(), handle.private_copy()
    apply_(dropped, Drop("block", 1))
    apply_(w8a8, Quantize("int8", activations=True))
    for model in (handle, dropped, w8a8):
        got, want = model.outputs(tokens), model.forward(tokens)
        # OPT's bridge keeps hooks of its own on the MLP's hook points, so its base runs through
        # the bridge, where a forward is the only way to its logits: held, as before
        assert isinstance(got, ReadLogits) or (family == "opt" and model is handle)
        for window in range(tokens.shape[0]):
            _close(rows_of(got, window, 0, tokens.shape[1]), want[window])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_parts_dropped_together_from_the_recorded_pass_equal_a_hooked_forward(family, family_handles):
    """`check_drops` reruns only the blocks after the first dropped part, from the recorded
    pass: the same metrics as the whole forward with the parts dropped under hooks."""
    from analysis.compress.prune.pruning import Drop
    from analysis.redundancy import drops as layer_drop
    from analysis.redundancy import report as rr
    from lib.scoring import prepare_base

    handle = family_handles[family]
    batch = _batch(handle)
    res = rr.residual_pass(handle, batch)
    reference = prepare_base(handle.forward(batch.tokens), batch)
    for parts in ([Drop("mlp", 0), Drop("attention", 2)], [Drop("attention", 1), Drop("mlp", 1)],
                  [Drop("block", 0), Drop("mlp", 2)], [Drop("attention", 2)]):
        fast = layer_drop.lm_dropped_together(handle, batch, res, parts, reference)
        hooked = layer_drop.evaluate_dropped(handle, batch, parts, reference)
        for name in ("nll", "kl_to_base", "agreement"):
            assert getattr(fast, name) == pytest.approx(getattr(hooked, name), rel=1e-4, abs=1e-6), (parts, name)


def test_the_readme_table_is_the_matrix():
    """The README's family table is `tools.families.readme_table()`, whose families are
    the ones every matrix test runs on and whose columns name matrix tests that exist."""
    from pathlib import Path

    import test_families_lab

    from tools.families import VIEWS, readme_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert readme_table() in readme
    matrix = {name: getattr(module, name) for module in (__import__(__name__), test_families_lab)
              for name in dir(module) if name.startswith("test_")}
    for view, tests in VIEWS.items():
        for name in tests:
            marks = [m for m in getattr(matrix.get(name), "pytestmark", []) if m.name == "parametrize"]
            assert marks and list(marks[0].args[1]) == FAMILY_NAMES, (view, name)
