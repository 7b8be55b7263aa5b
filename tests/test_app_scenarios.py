"""AppTest runs of every guided scenario (ui.scenarios, ui.tour): each step's page opens
with its controls set, its lab recipe made, and its computed check passing on the bundled
model; a link starts a scenario; a bad link says what exists."""

from __future__ import annotations

import pytest

from ui.scenarios import SCENARIOS

from apptest_helpers import new_app, run


def banner(at):
    return [s.value for s in at.success] + [w.value for w in at.warning]


def start(at, key):
    at.selectbox(key="tour_choice").set_value(key)
    run(at)
    at.button(key="tour_start").click()
    return run(at)


@pytest.mark.slow
@pytest.mark.parametrize("key", list(SCENARIOS))
def test_every_step_of_every_scenario_passes_its_check(key):
    scenario = SCENARIOS[key]
    at = start(run(new_app()), key)
    for index, step in enumerate(scenario.steps):
        assert at.session_state["tour"] == (key, index)
        shown = " ".join(m.value for m in at.markdown)
        assert f"step {index + 1} of {len(scenario.steps)}" in shown and step.text in shown
        seen = [s for s in at.success if s.value.startswith("What you should see")]
        assert len(seen) == 1, (key, index, banner(at), [e.value for e in at.error])
        assert not at.exception and not at.error, [e.value for e in at.error]
        for widget, value in step.presets(_handle(at)).items():
            assert at.session_state[widget] == value
        at.button(key="tour_next").click()
        run(at)
    assert "tour" not in at.session_state  # Finish ended it


def _handle(at):
    from ui.session import load_base

    return load_base(at.session_state["load_request"])


def test_a_link_starts_a_scenario_at_its_step():
    at = new_app()
    at.query_params["tour"] = "cnn-map"
    at.query_params["step"] = "3"
    run(at)
    assert at.session_state["tour"] == ("cnn-map", 2)
    assert at.session_state["load_request"].spec == "zoo:digits-cnn"
    assert at.session_state["interpreter_image_zoo:digits-cnn"] == 7
    assert any(s.value.startswith("What you should see") for s in at.success)


@pytest.mark.parametrize("query", [{"tour": "nope"}, {"tour": "induction", "step": "9"},
                                   {"tour": "induction", "step": "-1"}, {"tour": "<script>", "step": "x" * 5000}])
def test_a_bad_scenario_link_says_what_exists(query):
    at = new_app()
    for k, v in query.items():
        at.query_params[k] = v
    run(at)
    errors = [e.value for e in at.sidebar.error]
    assert len(errors) == 1 and "does not exist" in errors[0] and "induction (steps 1–3)" in errors[0]
    assert "tour" not in at.session_state and at.session_state["load_request"].spec == "zoo:code-lm"
