"""Layer redundancy: hooks vs plain HF forward, CKA properties, drop sweep exactness."""

import math

import pytest
import torch

from analysis import lens as lens_module
from analysis.compress.prune.pruning import Drop, dropping
from analysis.redundancy import cka
from analysis.redundancy import drops as layer_drop
from analysis.redundancy import similarity as redundancy
from lib import data
from lib.errors import RecipeError
from lib.hooks import count_hooks


@pytest.fixture(scope="module")
def batch(tiny_lm):
    return data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=4)


@pytest.fixture(scope="module")
def residuals(tiny_lm, batch):
    return redundancy.collect_residuals(tiny_lm, batch, skip=2)


def test_similarities_match_plain_hf_forward(tiny_gpt2_dir, tiny_lm, batch, residuals):
    """x_l from output_hidden_states, m_l from a pre-hook on ln_2, y_l from a block hook."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(tiny_gpt2_dir), attn_implementation="eager").eval()
    mids, outs = {}, {}
    handles = []
    for l, block in enumerate(hf.transformer.h):
        handles.append(block.ln_2.register_forward_pre_hook(lambda m, a, l=l: mids.__setitem__(l, a[0])))
        handles.append(block.register_forward_hook(
            lambda m, a, o, l=l: outs.__setitem__(l, o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        hidden = hf(batch.tokens, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    sim = redundancy.layer_similarity(residuals)
    s = 2
    for l in range(3):
        x, m, y = hidden[l][:, s:], mids[l][:, s:], outs[l][:, s:]
        cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()
        assert abs(sim.block[l] - cos(x, y)) < 1e-5
        assert abs(sim.attention[l] - cos(x, m)) < 1e-5
        assert abs(sim.mlp[l] - cos(m, y)) < 1e-5


def test_statistics_pass_stops_before_the_unembedding(tiny_lm, batch, residuals):
    """The pass for statistics runs no readout; its residuals equal a full cached run
    and the logits computed on demand equal the model's forward."""
    calls = []
    handle = tiny_lm.model.unembed.register_forward_hook(lambda *a: calls.append(1))
    try:
        lean = redundancy.collect_residuals(tiny_lm, batch, skip=2, with_logits=False)
    finally:
        handle.remove()
    assert calls == [] and lean.logits is None
    assert count_hooks(tiny_lm.model) == 0
    _, cache = tiny_lm.model.run_with_cache(batch.tokens, prepend_bos=False)  # TransformerLens itself
    assert torch.allclose(lean.resid[-1], cache["blocks.2.hook_resid_post"], atol=1e-6)
    assert torch.allclose(lean.mid[1], cache["blocks.1.hook_resid_mid"], atol=1e-6)
    forward = tiny_lm.forward(batch.tokens)
    assert torch.allclose(redundancy.final_logits(tiny_lm, lean), forward, atol=1e-5)
    assert torch.allclose(residuals.logits, forward, atol=1e-5)


def test_cka_self_is_one_and_rotation_invariant():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(16, 24, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(
        300, 24, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    assert math.isclose(cka.linear_cka(x, x), 1.0, rel_tol=1e-9)
    assert math.isclose(cka.linear_cka(x @ q, y), cka.linear_cka(x, y), rel_tol=1e-9)
    mat = cka.cka_matrix([x, y, x @ q])
    assert torch.allclose(mat.diagonal(), torch.ones(3, dtype=torch.float64))
    assert math.isclose(float(mat[0, 2]), 1.0, rel_tol=1e-5)
    assert math.isclose(float(mat[0, 1]), cka.linear_cka(x, y), rel_tol=1e-4)


def test_minibatch_cka_estimates_the_exact_value():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6000, 8, generator=gen)
    y = x @ torch.randn(8, 8, generator=gen) + torch.randn(6000, 8, generator=gen)
    exact = cka.linear_cka(x, y)
    est = cka.cka_matrix([x, y], minibatch=500, exact_max=1000)
    assert abs(float(est[0, 1]) - exact) < 0.03
    assert math.isclose(float(est[0, 0]), 1.0, rel_tol=1e-9)


def test_angular_distance_and_cka_diagonals(residuals):
    sim = redundancy.layer_similarity(residuals)
    assert torch.all(sim.angular.diagonal() == 0)  # computed, not filled in
    last = residuals.resid[:, :, -1].double()  # [L+1, batch, d]
    cos = torch.nn.functional.cosine_similarity(last[:, None], last[None, :], dim=-1)
    reference = (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean(-1)  # METHODS: arccos(cos) / pi
    off = ~torch.eye(4, dtype=torch.bool)
    assert torch.allclose(sim.angular[off].double(), reference[off], atol=1e-5)
    assert torch.allclose(sim.cka.diagonal(), torch.ones(4, dtype=torch.float64))
    assert sim.angular.shape == (4, 4) and torch.allclose(sim.angular, sim.angular.T)
    assert sim.n_tokens == 4 * 22


def _brute_force_lens(hf, residuals, skip):
    """Every depth's full softmax, LN_final applied to h_l itself (METHODS §1)."""
    lp = torch.log_softmax(hf.lm_head(hf.transformer.ln_f(residuals.resid[:, :, skip:])), -1)  # [L+1, b, pos, V]
    p = lp.exp()
    kl = (p[-1] * (lp[-1] - lp)).sum(-1).mean((1, 2))
    entropy = -(p * lp).sum(-1).mean((1, 2))
    agreement = (lp.argmax(-1) == lp[-1].argmax(-1)).float().mean((1, 2))
    return kl, entropy, agreement


@pytest.mark.parametrize("affine", [True, False], ids=["affine-unembedding", "generic-readout"])
@pytest.mark.parametrize("with_logits", [True, False])
def test_logit_lens_matches_full_softmax(tiny_lm, batch, monkeypatch, affine, with_logits):
    """Both readout paths (an affine unembedding into a reused buffer, or one generic
    readout), both sources of the final logits (cached rows or a readout of h_L) and
    token chunks that split prompts agree with a brute-force lens."""
    res = redundancy.collect_residuals(tiny_lm, batch, skip=2, with_logits=with_logits)
    if not affine:
        from lib.lm_capabilities import LMBlocks

        monkeypatch.setattr(LMBlocks, "unembedding", lambda blocks: None)
    else:
        assert tiny_lm.blocks.unembedding() is not None
    # several uneven token chunks (25, 25, 25, 13 of 88 tokens), across prompt boundaries (22 tokens each)
    monkeypatch.setattr(lens_module, "LENS_CHUNK_ELEMENTS", 25 * tiny_lm.structure.d_vocab)
    lens = lens_module.logit_lens(tiny_lm, res)
    kl, entropy, agreement = _brute_force_lens(tiny_lm.hf_model, res, skip=2)
    assert torch.allclose(lens.kl, kl, atol=1e-5)
    assert torch.allclose(lens.entropy, entropy, atol=1e-5)
    assert torch.equal(lens.agreement, agreement)
    assert lens.kl[-1] == 0 and lens.agreement[-1] == 1 and lens.kl[0] > 0


def test_soft_capped_readout_is_not_treated_as_affine(tiny_lm, monkeypatch):
    from lib.lm_capabilities import LMBlocks

    plain = LMBlocks.readout
    monkeypatch.setattr(LMBlocks, "readout", lambda blocks, h: 2 * torch.tanh(plain(blocks, h) / 2))
    assert tiny_lm.blocks.unembedding() is None


def test_sweep_reading_logits_out_chunk_by_chunk_equals_the_held_sweep(tiny_lm, batch, residuals, monkeypatch):
    """Where logits would be large the sweep never holds them (`lib.scoring.ReadLogits`):
    forced here, it measures what the sweep with held logits measures."""
    import lib.scoring

    held = layer_drop.lm_drop_sweep(tiny_lm, batch, residuals)
    monkeypatch.setattr(lib.scoring, "HELD_LOGITS_BYTES", 0)
    lean = layer_drop.lm_drop_sweep(tiny_lm, batch, residuals)
    assert lean.dropped.keys() == held.dropped.keys()
    for drop, m in held.dropped.items():
        assert lean.dropped[drop].nll == pytest.approx(m.nll, rel=1e-5)
        assert lean.dropped[drop].kl_to_base == pytest.approx(m.kl_to_base, rel=1e-4, abs=1e-7)
        assert lean.dropped[drop].agreement == m.agreement


def test_prefix_reuse_sweep_equals_naive_reruns(tiny_lm, batch, residuals):
    fast = layer_drop.lm_drop_sweep(tiny_lm, batch, residuals)
    slow = layer_drop.naive_lm_drop_sweep(tiny_lm, batch)
    assert fast.dropped.keys() == slow.dropped.keys() and len(fast.dropped) == 9
    for module in fast.dropped:
        for metric in ("nll", "kl_to_base", "agreement"):
            assert abs(getattr(fast.dropped[module], metric) - getattr(slow.dropped[module], metric)) < 1e-5
    assert fast.dropped[Drop("block", 1)].kl_to_base > 0
    assert count_hooks(tiny_lm.model) == 0


def test_drops_change_output_leave_base_intact_and_remove_hooks(tiny_lm, batch):
    before = tiny_lm.current_fingerprint()
    base = tiny_lm.forward(batch.tokens)
    m = layer_drop.evaluate_dropped(tiny_lm, batch, [Drop("attention", 0), Drop("mlp", 2)], base)
    assert m.kl_to_base > 0
    assert torch.equal(tiny_lm.forward(batch.tokens), base)
    assert tiny_lm.current_fingerprint() == before
    with pytest.raises(RuntimeError):
        with dropping(tiny_lm, [Drop("block", 0)]):
            assert count_hooks(tiny_lm.model) == 2  # the counter sees hooks that are there
            raise RuntimeError("boom")
    assert count_hooks(tiny_lm.model) == 0
    assert torch.equal(tiny_lm.forward(batch.tokens), base)


def test_bad_inputs_get_clear_messages(tiny_lm, tmp_path, monkeypatch):
    from lib.models import load_model

    from conftest import save_tiny_gpt2

    short = data.TextBatch(torch.full((2, 3), 256), 4, True, "short")
    with pytest.raises(redundancy.RedundancyError, match="skipped"):
        redundancy.collect_residuals(tiny_lm, short, skip=4)
    save_tiny_gpt2(tmp_path, n_layer=1)
    one = load_model(str(tmp_path))
    with pytest.raises(redundancy.RedundancyError, match="at least 2"):
        redundancy.collect_residuals(one, data.code_batch(one.tokenizer, 24, 2))
    monkeypatch.setattr(tiny_lm, "record", lambda tokens, points, caught=None: {})
    with pytest.raises(redundancy.RedundancyError, match="does not expose resid_pre 0"):
        redundancy.collect_residuals(tiny_lm, data.code_batch(tiny_lm.tokenizer, 24, 2))
    monkeypatch.undo()
    with pytest.raises(RecipeError, match="not a part of this 3-layer model"):
        layer_drop.evaluate_dropped(tiny_lm, data.code_batch(tiny_lm.tokenizer, 24, 2), [Drop("block", 7)], None)


def test_cnn_stages(tmp_path):
    from lib.models import load_model, save_image_model
    from lib.zoo.nets import DigitsCNN

    torch.manual_seed(0)
    save_image_model(DigitsCNN(width=4), "digits-cnn", tmp_path, width=4)
    handle = load_model(str(tmp_path))
    batch = data.digits_batch(n=40)
    sweep = layer_drop.stage_drop_sweep(handle, batch)
    assert {m.layer for m in sweep.dropped} == {"conv2"}
    assert Drop("stage", "conv1") in sweep.not_droppable
    with pytest.raises(RecipeError, match="cannot be bypassed"):
        layer_drop.evaluate_dropped(handle, batch, [Drop("stage", "pool1")], None)
    assert count_hooks(handle.model) == 0


def test_stage_similarity(tmp_path):
    from lib.models import load_model, save_image_model
    from lib.zoo.nets import DigitsCNN

    save_image_model(DigitsCNN(width=4), "digits-cnn", tmp_path, width=4)
    result = redundancy.stage_similarity(load_model(str(tmp_path)), data.digits_batch(n=30))
    assert result.names[0] == "input" and len(result.names) == 9
    assert torch.allclose(result.cka.diagonal(), torch.ones(9, dtype=torch.float64))
    assert set(result.similarity) == {"conv2"}  # the only stage whose shapes match


def test_one_sessions_hooks_never_act_on_another_sessions_forward(tiny_lm, batch):
    """Streamlit serves every session from one base model, each in its own thread."""
    import threading

    base = tiny_lm.forward(batch.tokens)
    inside, results = threading.Event(), {}

    def session_a():
        with dropping(tiny_lm, [Drop("block", 0)]):
            inside.set()
            results["a"] = tiny_lm.forward(batch.tokens)
            threading.Event().wait(0.5)  # B asks for a forward meanwhile

    def session_b():
        inside.wait()
        results["b"] = tiny_lm.forward(batch.tokens)

    threads = [threading.Thread(target=session_a), threading.Thread(target=session_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not torch.equal(results["a"], base)  # A saw its drop
    assert torch.equal(results["b"], base)  # B waited for A's hooks to go
    assert count_hooks(tiny_lm.model) == 0
