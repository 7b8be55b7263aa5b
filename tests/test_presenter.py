"""Large text for a projector (`ui.presenter`): the figures' labels grow in the session
that asked for it, and only there; the page's text grows by CSS."""

from __future__ import annotations

import json

import plotly.graph_objects as go

from ui import presenter
from ui.session import LoadRequest

from apptest_helpers import new_app, run


def test_labels_around_the_plot_grow_and_text_inside_it_does_not():
    heads = [f"L{i // 4}H{i % 4}" for i in range(20)]
    fig = go.Figure([go.Heatmap(z=[[1, 2]], colorbar=dict(title="score", tickfont=dict(size=10))),
                     go.Scatter(x=[0, 1], y=[0, 1], mode="markers+text", text=["a", "b"])])
    fig.update_layout(xaxis=dict(tickfont=dict(size=10)), yaxis=dict(tickmode="array", tickvals=heads,
                      ticktext=heads, tickfont=dict(size=10)), height=300,
                      annotations=[dict(text="subplot title", font=dict(size=16))])
    before = fig.to_dict()
    spec = presenter.enlarged(fig)
    layout = spec["layout"]
    assert layout["font"]["size"] == presenter.BASE_FONT_PX > 12
    assert layout["xaxis"]["tickfont"]["size"] == 14  # 10 px ticks x FONT_SCALE
    assert layout["yaxis"]["tickfont"]["size"] == 10  # 20 explicit head labels: sized to fit, kept
    assert layout["annotations"][0]["font"]["size"] == 16  # a subplot title fits its column
    assert spec["data"][0]["colorbar"]["tickfont"]["size"] == 14
    assert spec["data"][1]["textfont"]["size"] == 12  # node names stay where they fit
    assert layout["height"] > 300
    assert fig.to_dict() == before  # the figure passed in is not changed
    assert presenter.enlarged({"data": []}) == {"data": []}  # not a figure: as it is


def _chart_fonts(at) -> list:
    return [json.loads(c.proto.spec)["layout"].get("font", {}).get("size") for c in at.get("plotly_chart")]


def test_the_toggle_enlarges_this_sessions_charts_and_text():
    at = new_app()
    at.session_state["load_request"] = LoadRequest("zoo:induction-2l")
    run(at)
    assert _chart_fonts(at) and presenter.BASE_FONT_PX not in _chart_fonts(at)
    assert not any(presenter.CSS in h.proto.body for h in at.get("html"))
    at.toggle(key=presenter.KEY).set_value(True)
    run(at)
    assert set(_chart_fonts(at)) == {presenter.BASE_FONT_PX}
    assert any(presenter.CSS in h.proto.body for h in at.get("html"))

    other = new_app()  # another browser at the same time: its charts as built
    other.session_state["load_request"] = LoadRequest("zoo:induction-2l")
    run(other)
    assert presenter.BASE_FONT_PX not in _chart_fonts(other)
