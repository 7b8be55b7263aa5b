"""Figures: what a reader of each chart sees, checked on the figure specs (no browser).

Inputs are result dataclasses built by hand, so each test states the numbers it draws.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest
import torch

from analysis import plots
from analysis.compress.prune.pruning import Drop
from analysis.lens import LogitLens
from analysis.predict import ImagePrediction, NextTokens
from analysis.redundancy import plots as rplots
from analysis.redundancy.drops import DropSweep
from analysis.redundancy.similarity import LayerSimilarity, StageSimilarity
from lib.metrics import Metrics


def similarity(n_layers: int = 2, relative_update: tuple[float, ...] = (0.458, 0.431)) -> LayerSimilarity:
    depths = n_layers + 1
    return LayerSimilarity(
        block=torch.tensor([0.9, 0.95][:n_layers]), attention=torch.tensor([0.93, 0.96][:n_layers]),
        mlp=torch.tensor([0.93, 0.96][:n_layers]), angular=torch.rand(depths, depths), cka=torch.eye(depths),
        norms=torch.arange(1.0, depths + 1), relative_update=torch.tensor(relative_update), n_tokens=10, skip=4)


def lens(depths: int = 3) -> LogitLens:
    return LogitLens(kl=torch.linspace(2, 0, depths), agreement=torch.linspace(0, 1, depths),
                     entropy=torch.linspace(3, 1, depths))


def metrics(**fields) -> Metrics:
    return Metrics(n_params=10, size_bits=320, **fields)


def lm_sweep() -> DropSweep:
    dropped = {Drop(kind, layer): metrics(bits_per_byte=2.0 + layer, kl_to_base=0.1)
               for kind in ("block", "attention", "mlp") for layer in range(2)}
    return DropSweep(metrics(bits_per_byte=1.5), dropped, {})


def stage_sweep(droppable: bool = True) -> DropSweep:
    blocked = {Drop("stage", "conv1"): "shape changes"}
    dropped = {Drop("stage", "conv2"): metrics(accuracy=0.5, kl_to_base=0.3)} if droppable else {}
    return DropSweep(metrics(accuracy=0.9), dropped, blocked)


def stages() -> StageSimilarity:
    return StageSimilarity(["input", "conv1", "conv2"], torch.eye(3), {"conv2": 0.8}, torch.ones(3))


# ------------------------------------------------------------------ next tokens

def test_ten_tokens_that_display_alike_give_ten_bars():
    # two partial UTF-8 bytes both decode to "�"; before, plotly keyed bars by label and merged them
    tokens = ["\ufffd", "\ufffd", " a", "a", " ", "  ", "\n", "", "<b>", "&"]
    result = NextTokens(tokens, list(range(100, 110)), torch.linspace(0.3, 0.01, 10), 5, 0)
    fig = plots.next_tokens_bar(result)
    bar = fig.data[0]
    assert len(bar.x) == 10 and len(set(bar.y)) == 10
    ticks = list(fig.layout.yaxis.ticktext)
    assert len(ticks) == len(set(ticks)) == 10
    assert "(id 100)" in ticks[0] and "(id 101)" in ticks[1]  # the look-alikes say which token they are
    assert list(fig.layout.yaxis.tickvals) == list(bar.y)
    assert fig.layout.yaxis.autorange == "reversed"  # the most likely token on top


def test_token_labels_mark_whitespace_and_escape_markup():
    assert plots.token_label(" a").endswith("␣</span>a")
    assert plots.token_label(" a") != plots.token_label("a") != plots.token_label("␣a")
    assert "↵" in plots.token_label("\n") and "⇥" in plots.token_label("\t")
    assert plots.token_label("<b>") == "&lt;b&gt;"  # plotly would otherwise draw the label bold
    assert plots.token_label("a&b") == "a&amp;b"
    assert "∅" in plots.token_label("")


def test_every_class_is_labelled():
    fig = plots.class_probs_bar(ImagePrediction(torch.zeros(1, 8, 8), torch.full((10,), 0.1), None))
    assert fig.layout.xaxis.type == "category"  # numeric strings would otherwise become a linear axis
    assert list(fig.data[0].x) == [str(i) for i in range(10)]


# ------------------------------------------------------------------ axes

def integer_axes(fig: go.Figure) -> list:
    return [getattr(fig.layout, name) for name in fig.layout if name.startswith(("xaxis", "yaxis"))
            and getattr(fig.layout, name).title.text in ("layer", "depth", "block", "n (blocks skipped)",
                                                         "l (start depth)")]


@pytest.mark.parametrize("make", [
    lambda: rplots.importance_bars(similarity()),
    lambda: rplots.lens_lines(lens()),
    lambda: rplots.depth_lines(similarity()),
    lambda: rplots.angular_heatmap(torch.rand(3, 3)),
])
def test_integer_axes_of_a_two_layer_model_tick_whole_numbers(make):
    axes = integer_axes(make())
    assert axes
    for axis in axes:
        assert (axis.tickmode, axis.tick0, axis.dtick) == ("linear", 0, 1)


def test_integer_axis_thins_ticks_on_deep_models():
    assert [plots.integer_axis(n)["dtick"] for n in (2, 16, 17, 33, 48, 100, 500)] == [1, 1, 2, 5, 5, 10, 50]


def test_relative_updates_less_than_a_decade_apart_get_a_linear_axis_from_zero():
    fig = rplots.depth_lines(similarity(relative_update=(0.458, 0.431)))
    assert fig.layout.yaxis2.type == "linear" and fig.layout.yaxis2.rangemode == "tozero"
    assert "log" not in fig.layout.annotations[1].text


@pytest.mark.parametrize("values", [(0.458, 0.0431), (0.031, 0.458, 0.2), (0.0012, 0.95), (3e-7, 0.5)])
def test_a_log_axis_has_two_labelled_ticks_inside_the_data(values):
    fig = rplots.depth_lines(similarity(relative_update=values))
    axis = fig.layout.yaxis2
    assert axis.type == "log" and axis.tickformat == "~g" and "log" in fig.layout.annotations[1].text
    inside = [t for t in axis.tickvals if min(values) <= t <= max(values)]
    assert len(inside) >= 2
    low, high = axis.range  # log10 units; the smallest bar stays visible above the lower edge
    assert low <= math.log10(min(values)) - 0.4 and high > math.log10(max(values))


def test_log_ticks_hold_two_values_in_every_interval_of_a_decade_or_more():
    for lo in [10 ** (k / 7) for k in range(-30, 8)]:
        for decades in (1, 1.3, 2.9, 3.1, 6):
            hi = lo * 10**decades
            inside = [t for t in plots.log_ticks(lo, hi) if lo * (1 - 1e-12) <= t <= hi * (1 + 1e-12)]
            assert len(inside) >= 2, (lo, hi)


def test_importance_bars_switch_to_log_only_over_a_decade():
    assert rplots.importance_bars(similarity()).layout.yaxis.type == "linear"
    spread = LayerSimilarity(torch.tensor([0.5, 0.999]), torch.tensor([0.9, 0.99]), torch.tensor([0.9, 0.99]),
                             torch.rand(3, 3), torch.eye(3), torch.ones(3), torch.ones(2), 10, 4)
    yaxis = rplots.importance_bars(spread).layout.yaxis
    assert yaxis.type == "log" and "log" in yaxis.title.text
    assert sum(0.001 <= t <= 0.5 for t in yaxis.tickvals) >= 2


def test_a_zero_value_keeps_a_linear_axis_and_a_nan_is_ignored():
    assert plots.value_axis(torch.tensor([0.0, 0.5]))["type"] == "linear"  # a log axis would hide the zero bar
    assert plots.value_axis(torch.tensor([float("nan"), 0.01, 0.5]))["type"] == "log"


# ------------------------------------------------------------------ drop cost

def test_drop_cost_x_axis_says_layer_on_language_models_and_stage_on_image_models():
    assert rplots.drop_cost_bars(lm_sweep(), "bits_per_byte", "bits per byte").layout.xaxis.title.text == "layer"
    assert rplots.drop_cost_bars(stage_sweep(), "accuracy", "accuracy").layout.xaxis.title.text == "stage"
    assert rplots.drop_cost_bars(stage_sweep(False), "accuracy", "accuracy").layout.xaxis.title.text == "stage"


def test_drop_cost_bars_show_the_measured_change():
    fig = rplots.drop_cost_bars(lm_sweep(), "bits_per_byte", "bits per byte")
    assert [trace.name for trace in fig.data] == ["block", "attention", "mlp"]
    assert list(fig.data[0].y) == [0.5, 1.5] and list(fig.data[0].x) == ["0", "1"]


def test_drop_cost_hover_offers_kl_only_where_there_is_one():
    denoiser = DropSweep(metrics(psnr_db=20.0), {Drop("stage", "conv2"): metrics(psnr_db=18.0)}, {})
    assert "KL" not in rplots.drop_cost_bars(denoiser, "psnr_db", "PSNR (dB)").data[0].hovertemplate
    assert "KL" in rplots.drop_cost_bars(stage_sweep(), "accuracy", "accuracy").data[0].hovertemplate


# ------------------------------------------------------------------ heat maps and titles

HEATMAPS = [
    lambda: plots.matrix_heatmap(torch.eye(3), ["0", "1", "2"], "", 1.0, "depth", "depth"),
    lambda: rplots.cka_heatmap(torch.eye(3), ["0", "1", "2"], "depth"),
    lambda: rplots.cka_heatmap(stages().cka, stages().names, "stage"),
    lambda: rplots.angular_heatmap(torch.rand(3, 3)),
]


@pytest.mark.parametrize("make", HEATMAPS)
def test_every_heat_map_colour_bar_has_a_title(make):
    maps = [t for t in make().data if t.type == "heatmap" and t.showscale is not False]
    assert maps and all(t.colorbar.title.text for t in maps)


def test_cka_axes_are_categories_named_by_depth_or_stage():
    fig = rplots.cka_heatmap(torch.eye(3), ["0", "1", "2"], "depth")
    assert fig.layout.xaxis.type == fig.layout.yaxis.type == "category"
    assert fig.data[0].colorbar.title.text == "linear CKA" and fig.layout.xaxis.title.text == "depth"


@pytest.mark.parametrize("make", [
    lambda: plots.next_tokens_bar(NextTokens(["a"], [1], torch.tensor([1.0]), 2, 0)),
    lambda: rplots.importance_bars(similarity()),
    lambda: rplots.drop_cost_bars(lm_sweep(), "bits_per_byte", "bits per byte"),
    lambda: rplots.lens_lines(lens()),
    lambda: rplots.depth_lines(similarity()),
    lambda: rplots.stage_importance_bars(stages()),
    lambda: rplots.cka_heatmap(torch.eye(3), ["0", "1", "2"], "depth"),
    lambda: rplots.angular_heatmap(torch.rand(3, 3)),
])
def test_figures_under_a_section_header_have_no_title_of_their_own(make):
    assert make().layout.title.text is None
