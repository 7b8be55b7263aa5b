"""Base and edited model side by side (analysis.compress.compare): flipped answers, the
KL strip, the internals per depth against the Redundancy page's own computation, and
head roles against the base's where an edit cannot have changed them."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.compress import compare as cmp
from analysis.compress.lab import Lab
from analysis.compress.prune.pruning import Drop, RemoveHeads
from analysis.redundancy import report as rr
from lib import data
from lib.handle import Point
from lib.spread import Scores


def _scores(kl, top1, base_top1, width=3):
    n = len(kl)
    return Scores(unit="window", n_units=n // width, unit_of=torch.arange(n) // width, width=width,
                  nll=torch.zeros(n), kl=torch.tensor(kl), top1=torch.tensor(top1), base_top1=torch.tensor(base_top1))


def test_flips_are_the_changed_answers_worst_first():
    s = _scores([0.1, 2.0, 0.5, 3.0, 0.2, 0.9], [1, 2, 3, 4, 5, 6], [1, 9, 3, 9, 9, 6])
    tokens = torch.tensor([[0, 10, 11, 12], [0, 13, 14, 15]])
    batch = data.TextBatch(tokens, 0, True, "hand-made")
    shown, total = cmp.flips(s, batch)
    assert total == 3
    assert [(f.unit, f.position, f.top1, f.base_top1, f.target) for f in shown] == \
        [(1, 0, 4, 9, 13), (0, 1, 2, 9, 11), (1, 1, 5, 9, 14)]
    assert [f.kl for f in shown] == pytest.approx([3.0, 2.0, 0.2])
    assert len(cmp.flips(s, batch, limit=1)[0]) == 1
    assert cmp.kl_strip(s, 1).tolist() == pytest.approx([3.0, 0.2, 0.9])


def test_psnr_drops_list_the_images_that_lost_most():
    common = dict(unit="image", n_units=3, unit_of=torch.arange(3), width=1)
    base = Scores(**common, sq_err=torch.tensor([0.01, 0.01, 0.01]))
    edited = Scores(**common, sq_err=torch.tensor([0.01, 0.1, 0.02]))
    drops = cmp.psnr_drops(edited, base)
    assert [d.image for d in drops] == [1, 2, 0]
    assert drops[0].base_db == pytest.approx(20.0) and drops[0].edited_db == pytest.approx(10.0)


@pytest.fixture(scope="module")
def dropped_lab(tiny_lm):
    lab = Lab(tiny_lm, data.default_batch(tiny_lm, n_windows=4, seq_len=32), latency_repeats=0)
    lab.add(Drop("block", 1))
    return lab


def test_depth_profile_of_the_base_is_the_redundancy_pages(tiny_lm, dropped_lab):
    batch = cmp.internal_batch(dropped_lab.batch)
    profile = cmp.depth_profile(tiny_lm, batch, skip=4)
    res = rr.residual_pass(tiny_lm, batch)
    lens = rr.lens_statistics(tiny_lm, batch, res, 4)
    sim = rr.layer_statistics(tiny_lm, batch, res, 4)
    assert profile.lens.kl.tolist() == pytest.approx(lens.kl.tolist(), abs=1e-4)
    assert profile.lens.agreement.tolist() == pytest.approx(lens.agreement.tolist(), abs=1e-3)
    assert profile.block_change.tolist() == pytest.approx((1 - sim.block).tolist(), abs=1e-4)


def test_a_dropped_block_changes_nothing_in_the_edited_profile(dropped_lab):
    edited = dropped_lab.edited()
    profile = cmp.depth_profile(edited, cmp.internal_batch(dropped_lab.batch), skip=4)
    assert profile.block_change[1] == pytest.approx(0.0, abs=1e-6)
    assert profile.block_change[0] > 1e-4
    assert profile.lens.kl[-1] == pytest.approx(0.0, abs=1e-6)
    assert profile.removed == ("block 1",)
    # the stream entering block 1 is the base's: the lens there agrees up to the readout's reference
    base = cmp.depth_profile(dropped_lab.base, cmp.internal_batch(dropped_lab.batch), skip=4)
    assert profile.block_change[0] == pytest.approx(float(base.block_change[0]), abs=1e-5)


def test_the_internals_estimate_counts_only_the_windows_they_read(tiny_lm):
    """In forwards of the whole batch: twice the windows, half the share (they read the first
    INTERNAL_WINDOWS); and more than the states' forward of those windows alone."""
    four = data.default_batch(tiny_lm, n_windows=cmp.INTERNAL_WINDOWS, seq_len=32)
    eight = data.TextBatch(torch.cat([four.tokens, four.tokens]), 0, four.has_bos, four.source)
    share = cmp.internals_in_forwards(tiny_lm, four)
    assert cmp.internals_in_forwards(tiny_lm, eight) == pytest.approx(share / 2)
    assert share > 1  # the lens reads out every depth, not only the last


def test_roles_of_heads_an_edit_cannot_reach_are_unchanged(tiny_lm):
    lab = Lab(tiny_lm, data.default_batch(tiny_lm, n_windows=4, seq_len=32), latency_repeats=0)
    lab.add(RemoveHeads(1, (0, 2)))
    edited = lab.edited()
    probe = torch.randint(0, 256, (4, 31), generator=torch.Generator().manual_seed(0))
    before, after = cmp.role_table(tiny_lm, probe), cmp.role_table(edited, probe)
    for name in cmp.ROLE_SCORES:
        # layers 0 and 1 read the same stream (a head's pattern does not depend on its neighbours')
        kept = torch.ones_like(after[name], dtype=torch.bool)
        kept[1, [0, 2]] = False
        assert torch.isnan(after[name][1, [0, 2]]).all()
        assert after[name][:2][kept[:2]].tolist() == pytest.approx(before[name][:2][kept[:2]].tolist(), abs=1e-5)
    patterns = edited.record(probe, [Point("pattern", 0), Point("pattern", 1)])
    assert patterns[Point("pattern", 1)].shape[1] == 2
    changes = cmp.role_changes(tiny_lm, edited, lab.batch, top=1)
    assert {c.role for c in changes} == set(cmp.ROLE_SCORES)
    assert all((c.edited_score is None) == (c.layer == 1 and c.head in (0, 2)) for c in changes)
    assert all(not math.isnan(c.base_score) for c in changes)


def test_a_removed_blocks_heads_are_removed_in_the_role_table(tiny_lm, dropped_lab):
    probe = torch.randint(0, 256, (2, 31), generator=torch.Generator().manual_seed(1))
    table = cmp.role_table(dropped_lab.edited(), probe)
    assert torch.isnan(table["induction"][1]).all() and not torch.isnan(table["induction"][0]).any()


def test_the_report_shows_what_the_recipe_changed(dropped_lab):
    from analysis.compress import export

    dropped_lab.add(Drop("block", 2))
    page = export.html_report(dropped_lab)
    section = page[page.index("<h2>What the recipe changed</h2>"):]
    assert "percentile bootstrap over the 4 evaluation windows" in section
    verdicts = ("yes, worse", "yes, better", "no")
    assert "<td>bits per byte</td>" in section and any(f"<td>{v}</td>" in section for v in verdicts)
    assert "KL(base || edited) per token: median" in html_unescape(section)
    assert "Flipped answers" in section and "<mark" in section
    assert "KL strip: window" in section and "rgba(214,39,40" in section
    assert "Internals, base and edited" in section and "Head roles" in section
    assert page.count("plotly.js v") == 1  # the section's figure reuses the library inlined once
    dropped_lab.undo()


def html_unescape(text):
    import html

    return html.unescape(text)


@pytest.mark.parametrize("draw", ["strip", "flips"])
def test_token_text_wraps_inside_a_narrow_column_in_chromium(draw):
    """Whitespace is drawn as marks, so a window of code has no break of its own: it must wrap
    anywhere rather than run past the page (it did on GPT-2's tokens)."""
    from browser_helpers import chromium

    from analysis.compress import compare_view as view
    from lib.data import TextBatch

    tokens = list(range(64))
    decode = lambda t: "    " if t % 2 else "x"  # noqa: E731 - indentation and one letter, 64 times
    if draw == "strip":
        html = view.kl_strip_html(tokens, torch.rand(63), decode)
    else:
        batch = TextBatch(torch.tensor([tokens]), 0, False, "test", None)
        html = view.flips_html([cmp.Flip(0, 62, 1.0, 0, 1, 2)], batch, decode, context=64)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 800, "height": 600})
        page.set_content(f"<div id='column' style='width:500px'>{html}</div>")
        assert page.evaluate("() => { const c = document.getElementById('column');"
                             " return c.scrollWidth <= c.clientWidth }")
