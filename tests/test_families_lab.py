"""The family matrix (the lab): every edit type on a tiny checkpoint of every family,
each checked by a value: structural edits against plain transformers with plain torch
hooks, weight edits by what they promise (sparsity, rank, sharing, the format's grid),
and every exportable edited model against plain transformers reading the export."""

from __future__ import annotations

import io
import zipfile

import family_refs as ref
import pytest
import torch
from test_families import FAMILY_NAMES, TEXT


def _tokens(handle):
    from lib.data import text_batch

    return text_batch(handle.tokenizer, TEXT, seq_len=24, max_windows=4).tokens


def _edited(handle, *edits):
    from analysis.compress.recipe import Recipe, build

    return build(handle, Recipe(handle.fingerprint, list(edits)))


def _close(a, b, tol=2e-5):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def _exported_logits(edited, tokens, tmp_path):
    from analysis.compress.export import model_zip
    from lib.packed import PACKED_FILE, unpack_folder

    with zipfile.ZipFile(io.BytesIO(model_zip(edited, "edited"))) as archive:
        archive.extractall(tmp_path)
    folder = tmp_path / "edited"
    if (folder / PACKED_FILE).exists():  # NF4, FP6, FP8 E5M2, binary: LayerScope's packed codes, unpacked to float
        folder = unpack_folder(folder, tmp_path / "unpacked")
    return ref.logits(ref.plain_model(folder), tokens)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_structural_edits_equal_plain_hooks_and_export_exactly(family, family_handles, plain_models, tmp_path):
    from analysis.compress.prune.pruning import Drop, RemoveHeads, SkipLayers, kept_layers
    from lib.errors import CapabilityError

    handle, plain = family_handles[family], plain_models[family]
    tokens = _tokens(handle)
    before = handle.fingerprint
    L = handle.structure.n_layers
    skipped = [l for l in range(L) if l not in kept_layers(L, 1.5)]
    n_kv = plain.config.num_key_value_heads if hasattr(plain.config, "num_key_value_heads") else None
    group = handle.structure.n_heads // (n_kv or handle.structure.n_heads)
    heads = (0, 2) if group == 1 else tuple(range(group))  # grouped-query attention: a whole group
    cases = [((Drop("block", 1),), [("block", 1)], []), ((Drop("attention", 1),), [("attention", 1)], []),
             ((Drop("mlp", 1),), [("mlp", 1)], []), ((RemoveHeads(1, heads),), [], [(1, h) for h in heads]),
             ((SkipLayers(1.5),), [("block", l) for l in skipped], []),
             ((Drop("mlp", 0), Drop("attention", 2)), [("mlp", 0), ("attention", 2)], [])]
    for i, (edits, parts, heads) in enumerate(cases):
        edited = _edited(handle, *edits)
        want = ref.logits(plain, tokens, parts, heads)
        _close(edited.forward(tokens), want)
        assert edited.n_params < handle.n_params, edits
        _close(_exported_logits(edited, tokens, tmp_path / str(i)), want)
    assert handle.fingerprint == before
    if group > 1:  # one head of a group cannot go alone: said in words, the base untouched
        with pytest.raises(CapabilityError, match="goes only with its whole group"):
            _edited(handle, RemoveHeads(1, (0,)))


def _fraction_zero(layers):
    """The share of zero weights in the blocks' linear layers (scope "all"; not the unembedding)."""
    weights = [w for name, w in layers.items() if name.startswith("blocks.")]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pruning_low_rank_and_sharing_do_what_they_say(family, family_handles, tmp_path):
    from analysis.compress.prune.allocation import allocate, distortion_curves
    from analysis.compress.prune.factorize import LowRank, ShareLayers
    from analysis.compress.prune.pruning import Magnitude, Wanda

    handle = family_handles[family]
    tokens = _tokens(handle)
    for edit in (Magnitude(0.5), Wanda(0.5)):
        edited = _edited(handle, edit)
        assert _fraction_zero(edited.linear_layers()) == pytest.approx(0.5, abs=0.01), edit
        _close(_exported_logits(edited, tokens, tmp_path / type(edit).__name__), edited.forward(tokens))
    curves = distortion_curves(handle, tokens[:2], n_levels=4)
    plan = allocate(curves, 0.5)
    edited = _edited(handle, plan.edit())
    pruned = sum(int((w == 0).sum()) for name, w in edited.linear_layers().items() if name in curves.layers)
    assert pruned == round(0.5 * sum(int(n) for n in curves.sizes))  # the RD budget exactly
    low = _edited(handle, LowRank(rank=4, scope="mlp"))
    factored = [m.dense()["weight"] for m in low.plain_model().modules() if callable(getattr(type(m), "dense", None))]
    assert len(factored) == sum(".mlp." in name for name in handle.linear_layers())  # every MLP linear map
    assert all(int(torch.linalg.matrix_rank(w.double(), rtol=1e-5)) <= 4 for w in factored)
    _close(_exported_logits(low, tokens, tmp_path / "lowrank"), low.forward(tokens))
    shared = _edited(handle, ShareLayers(0, 1))
    _close(_exported_logits(shared, tokens, tmp_path / "shared"), shared.forward(tokens))
    blocks = ref.decoder_layers(ref.plain_model(tmp_path / "shared" / "edited"))
    weights = [(name, m.weight) for name, m in blocks[1].named_modules() if type(m).__name__ in ("Linear", "Conv1D")]
    assert weights and all(torch.equal(w, blocks[0].get_submodule(name).weight) for name, w in weights)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_quantization_format_llm_int8_and_early_exits(family, family_handles, tmp_path):
    from analysis.compress.exits.rule import EarlyExit
    from analysis.compress.quant.formats import FORMATS
    from analysis.compress.quant.quantize import LLMInt8, Quantize
    from lib.handle import Point

    handle = family_handles[family]
    tokens = _tokens(handle)
    base = handle.forward(tokens)
    for name, fmt in FORMATS.items():
        edited = _edited(handle, Quantize(name))
        weights = edited.linear_layers()
        changed = [n for n, w in weights.items() if not torch.equal(w, handle.linear_layers()[n])]
        assert changed, name  # every format moves some weight onto its grid
        assert edited.size_bits < handle.size_bits, name
        for n in changed:  # one scale group holds at most 2^bits values: the format's grid
            w, stored = weights[n], edited.storage[edited.weight_name(n)].format.split()[-1]  # "g64", "per-row"
            group = w.flatten() if fmt.group < 0 else w[0, : int(stored[1:]) if stored.startswith("g") else None]
            assert len(torch.unique(group)) <= 2 ** fmt.code_bits, (name, len(torch.unique(group)))
        _close(_exported_logits(edited, tokens, tmp_path / name), edited.forward(tokens))
    int8 = _edited(handle, LLMInt8(6.0)).forward(tokens)
    assert torch.isfinite(int8).all() and 0 < (int8 - base).abs().max() < (base.abs().max() + 1)
    every_token_leaves_first = _edited(handle, EarlyExit("max_prob", 0.0))
    h1 = handle.record(tokens, [Point("resid_pre", 1)])[Point("resid_pre", 1)]
    _close(every_token_leaves_first.forward(tokens), handle.blocks.readout(h1))
