"""Issue 22's display fixes: accuracy in percent (changes in points) on Redundancy and
Channels, one head-role threshold table for the graph and the sentences, plain-digit
changes, see-through quantization grid, every head labelled, share labels clear of the
singular values, the interpreter's sum without a doubled sign, the captum table in full,
the CNN Redundancy page without a "several modules" choice, the new glossary entries."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from analysis.channels import heads
from analysis.channels import plots as pc
from analysis.channels import report as rep
from analysis.compress.prune.pruning import Drop
from analysis.metric_text import metric_change, metric_value, readable
from analysis.redundancy import plots as rplots
from analysis.redundancy import report as rr
from analysis.redundancy.drops import DropSweep
from lib.metrics import Metrics

from apptest_helpers import load, new_app, run


def metrics(**fields) -> Metrics:
    return Metrics(n_params=10, size_bits=320, **fields)


# ------------------------------------------------------------------ numbers as text


@pytest.mark.parametrize("value, signed, shown", [
    (-515234.0, True, "-515,200"), (-5.152e5, False, "-515,200"), (0.031954, False, "0.03195"), (1.0, False, "1"),
    (12.3456, True, "+12.35"), (1234.5, False, "1,234"), (0.0, True, "+0"), (2e-5, False, "2e-05"),
])
def test_changes_read_in_plain_digits_at_ordinary_magnitudes(value, signed, shown):
    assert readable(value, signed=signed) == shown


def test_accuracy_reads_as_a_percentage_and_its_change_in_points():
    assert metric_value("accuracy", 1.0) == "100.0%" and metric_value("accuracy", 0.03195) == "3.2%"
    assert metric_change("accuracy", -0.96805) == "-96.8 points"
    assert metric_value("bits_per_byte", 3.21049) == "3.21" and metric_change("psnr_db", -5.3512) == "-5.351"


def stage_report(droppable: int) -> rr.RedundancyReport:
    dropped = {Drop("stage", f"conv{i}"): metrics(accuracy=0.1 * i, kl_to_base=0.3) for i in range(droppable)}
    return rr.RedundancyReport(DropSweep(metrics(accuracy=0.9875), dropped, {}), "accuracy", True, "digest")


def test_drop_sentence_and_bars_give_accuracy_in_percent_and_points():
    report = stage_report(2)
    assert rr.drop_sentence(report) == ("Cheapest single drop: stage conv1 (accuracy -88.8 points); most "
                                        "expensive: stage conv0 (-98.8 points). Base accuracy: 98.8%.")
    fig = rplots.drop_cost_bars(report.sweep, "accuracy", "accuracy")
    assert list(fig.data[0].y) == pytest.approx([-98.75, -88.75])  # percentage points, not fractions
    assert "percentage points" in fig.layout.yaxis.title.text and "points" in fig.data[0].hovertemplate
    other = rplots.drop_cost_bars(DropSweep(metrics(psnr_db=20.0), {Drop("stage", "mid"): metrics(psnr_db=-5e5)}, {}),
                                 "psnr_db", "PSNR (dB)")
    assert "%{y:+,.4~r}" in other.data[0].hovertemplate  # d3's "r" never writes -5.000e+5


# ------------------------------------------------------------------ head roles: one threshold table


def roles(previous: float, duplicate: float, induction: float) -> heads.HeadRoles:
    """Two layers of two heads; head L1H1 carries the given scores, the others score 0."""
    scores = {name: torch.zeros(2, 2) for name in ("previous_token", "duplicate_token", "induction", "sink")}
    for name, value in (("previous_token", previous), ("duplicate_token", duplicate), ("induction", induction)):
        scores[name][1, 1] = value
    zeros = torch.zeros(2, 2)
    return heads.HeadRoles(**scores, keys_90=zeros, key_fraction=zeros, regime=zeros.long(), n_sequences=1,
                           seq_len=4)


def graph_roles(head_roles: heads.HeadRoles) -> dict[tuple[int, int], str]:
    """What the channel graph says of each head: its hover text, "" when it has no role."""
    comp = SimpleNamespace(scores={"K": torch.zeros(2, 2, 2, 2)}, strongest=lambda mode, n: [])
    nodes = pc.channel_graph(comp, "K", 1, head_roles).data[-1]
    return {(int(x), int(y)): text for x, y, text in zip(nodes.x, nodes.y, nodes.customdata)}


@pytest.mark.parametrize("scores", [(0.4, 0.0, 0.0), (0.5, 0.0, 0.0), (0.0, 0.29, 0.3), (0.45, 0.35, 0.0),
                                    (0.0, 0.0, 0.0)])
def test_graph_and_sentences_use_one_threshold_per_role(scores):
    r = roles(*scores)
    held = heads.head_role(r, (1, 1))
    shown = graph_roles(r)
    assert shown[(1, 1)] == (f"{pc.ROLE_TITLES[held[0]]} {held[1]:.2f}" if held else "")
    assert all(text == "" for head, text in shown.items() if head != (1, 1))
    sentence = rep.roles_sentence(r).lower()  # the sentence's first role is capitalised
    listed = {role: f"{rep.ROLE_NAMES[role]} head: l1h1" in sentence for role in heads.ROLE_THRESHOLDS}
    for role, threshold in heads.ROLE_THRESHOLDS.items():
        assert listed[role] == bool(getattr(r, role)[1, 1] >= threshold)  # named exactly when it has the role
    assert any(listed.values()) == (held is not None)  # coloured in the graph exactly when the sentence names it


def test_a_previous_token_score_between_the_thresholds_is_no_role_anywhere():
    r = roles(0.4, 0.0, 0.0)  # the graph used 0.3 for every role, the sentence 0.5 for previous-token
    assert graph_roles(r)[(1, 1)] == ""
    assert rep.roles_sentence(r).startswith("No clear previous-token head (best L1H1, 0.40 < 0.5)")
    assert rep.role_rule() == "previous-token ≥ 0.5, duplicate-token ≥ 0.3, induction ≥ 0.3"


# ------------------------------------------------------------------ channels figures


@pytest.fixture(scope="module")
def code_lm_composition():
    from analysis.channels import circuits as ch
    from lib.models import load_model

    circuits = ch.circuits(load_model("zoo:code-lm"))
    return circuits, ch.composition_scores(circuits)


def test_composition_heat_map_labels_every_head(code_lm_composition):
    _, comp = code_lm_composition
    fig = pc.composition_heatmap(comp, "K")
    readers, writers = list(fig.data[0].x), list(fig.data[0].y)
    assert len(readers) == 20 and list(fig.layout.xaxis.tickvals) == readers  # 6 layers x 4 heads: all 20 named
    assert list(fig.layout.yaxis.tickvals) == writers and fig.layout.xaxis.tickmode == "array"
    many = [f"L{i // 12}H{i % 12}" for i in range(132)]  # GPT-2 small: every n-th, evenly
    assert pc._head_ticks(many, 420)["tickvals"] == many[::4]


def test_component_share_labels_and_singular_values_do_not_share_a_panel(code_lm_composition):
    from analysis.channels import circuits as ch

    circuits, comp = code_lm_composition
    top = comp.strongest("K", 1)[0]
    fig = pc.component_bars(ch.channel_components(circuits, comp, top.writer, top.reader, "K"))
    bars, line = fig.data
    assert bars.textposition == "outside" and bars.yaxis == "y" and line.yaxis == "y2"
    upper, lower = fig.layout.yaxis.domain, fig.layout.yaxis2.domain
    assert lower[1] < upper[0]  # the singular values sit in a panel below the labelled bars


# ------------------------------------------------------------------ quantization histogram


def histogram(n_grid: int):
    from analysis.compress.quant.quantize import GridHistogram

    edges = tuple(float(e) for e in range(17))
    grid = tuple(i * 16 / n_grid for i in range(n_grid))
    return GridHistogram("blocks.0.mlp.in", "int4", "INT4", "w / s + z", edges, (5,) * 16, grid, 0.01)


@pytest.mark.parametrize("n_grid", [16, 64])
def test_quantization_grid_leaves_the_bars_visible(n_grid):
    from analysis.compress.quant import plots as plots_quant

    fig = plots_quant.grid_histogram(histogram(n_grid))
    minor = fig.layout.xaxis.minor  # every grid value a red tick on the axis, outside the plot
    assert list(minor.tickvals) == list(histogram(n_grid).grid) and minor.ticks == "outside"
    grid = fig.data[1]
    if n_grid <= 40:  # few values: also a line up the plot, thin and see-through
        assert grid.mode == "lines" and grid.line.width <= 1 and grid.line.color.startswith("rgba(")
        assert float(grid.line.color.rstrip(")").split(",")[-1]) < 0.6
    else:  # many: nothing drawn over the bars, only the legend entry
        assert grid.mode == "markers" and list(grid.x) == [None]


# ------------------------------------------------------------------ interpreter


@pytest.mark.parametrize("bias, operator", [(5.155, "+ 5.155 bias"), (-5.155, "− 5.155 bias")])
def test_token_sentence_writes_the_bias_with_one_sign(bias, operator):
    from analysis.interpreter import report as interpreter_report

    result = SimpleNamespace(contributions=torch.tensor([1.0, 0.262]), texts=("a", "b"), value=1.262 + bias,
                             bias=bias, target=SimpleNamespace(label="logit “c”"))
    sentence = interpreter_report.token_sentence(result)
    assert "from the 2 positions " + operator in sentence
    assert "+ +" not in sentence and "+ -" not in sentence and "+ −" not in sentence


# ------------------------------------------------------------------ glossary


def test_glossary_has_the_terms_issue_22_asked_for():
    from ui.glossary import GLOSSARY, TERMS

    for key in ("wanda", "pareto_frontier", "nf4", "fp6", "binary_weights", "saliency", "integrated_gradients",
                "deeplift", "reconstruction_error", "fingerprint", "latency_change", "flop_prediction"):
        assert key in GLOSSARY, key
    assert "1 − 2/π" in GLOSSARY["binary_weights"] and "F(x0) − F(0)" in GLOSSARY["integrated_gradients"]
    assert "95%" in GLOSSARY["latency_change"] and "alternating" in GLOSSARY["latency_change"]
    assert TERMS["flop_prediction"].name == "FLOP prediction"


# ------------------------------------------------------------------ pages


def redundancy_page(spec):
    return run(load(run(new_app()), spec), "views/redundancy.py")


def test_cnn_redundancy_page_offers_its_one_drop_without_a_per_depth_promise():
    at = redundancy_page("zoo:digits-cnn")
    assert "Drop several modules" not in [s.value for s in at.subheader] and not at.slider and not at.radio
    captions = " ".join(c.value for c in at.caption)
    assert "each depth would predict" not in captions and "stage" in at.caption[0].value
    assert re.search(r"Only stage conv2 can be dropped: accuracy -\d+\.\d points\. Base accuracy: \d+\.\d%\.",
                     captions)
    [button] = at.main.button  # the one stage it can bypass, added on its own
    assert button.label == "Add this drop to the compression recipe"
    button.click()
    run(at)
    assert "the recipe now has 1 edit(s)" in at.success[0].value and not at.error
    cnn_recipe = next(lab.recipe for lab in at.session_state["labs"].values() if lab.recipe.model == "zoo:digits-cnn")
    assert cnn_recipe.edits == [Drop("stage", "conv2")]


def test_induction_model_redundancy_changes_read_in_points():
    at = redundancy_page("zoo:induction-2l")
    shown = {m.label: m for m in at.metric}
    assert shown["measured Δ accuracy"].value.endswith(" points")
    assert shown["predicted Δ accuracy"].value.endswith(" points")
    assert all(cell.endswith(" points") for cell in at.dataframe[0].value["Δ accuracy alone (measured)"])
    assert "Base accuracy: " in " ".join(c.value for c in at.caption) and not at.error


def test_a_composition_of_many_heads_is_drawn_without_a_click_marker_per_pair():
    """Llama-3.2-1B's 16 x 32 heads make 122,880 pairs: a marker on each made an 8.6 MB figure;
    its cells then show their score on hover alone, and the page offers the list and the graph."""
    from analysis.channels.circuits import Composition

    small, large = (Composition({m: torch.rand(L, H, L, H) for m in "QKV"}, 64) for L, H in ((12, 12), (16, 32)))
    assert pc.cells_clickable(small) and len(pc.composition_heatmap(small, "K").data) == 2  # heat map + markers
    assert not pc.cells_clickable(large)
    (heat,) = pc.composition_heatmap(large, "K").data
    assert heat.type == "heatmap" and "the random baseline" in heat.hovertemplate and heat.hoverinfo is None
