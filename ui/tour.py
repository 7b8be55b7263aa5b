"""A guided scenario on screen (`ui.scenarios`): the sidebar's list that starts one (or a
link, `?tour=<key>`), and above the page a banner with the step's sentence, its computed
check, and Back / Next / End. Taking a step loads the scenario's model, sets the step's
controls for the class (and outlines them), makes its change to the lab's recipe, and
opens its page.

    app.py: tour.from_link(); tour.picker(); tour.take_pending(handle); slot = st.container()
            ... page.run() ...; tour.banner(slot, handle, page.url_path)
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import streamlit as st

from analysis.compress.recipe import Recipe
from lib.errors import LayerScopeError
from lib.handle import ModelHandle
from ui.progress import Stopped
from ui.scenarios import SCENARIOS, Scenario, Step
from ui.session import LoadRequest, app_message, change_recipe, opted_in, placement_choice, request_load, session_lab

ACTIVE, PENDING, LINK_READ = "tour", "tour_pending", "tour_link_read"
TOUR_PARAM, STEP_PARAM = "tour", "step"


def _go(key: str, index: int) -> None:
    """Widget callback: take step `index` of scenario `key` at the top of the next run."""
    st.session_state[PENDING] = (key, index)


def _end() -> None:
    st.session_state.pop(ACTIVE, None)


def from_link() -> None:
    """Once per session: a `?tour=<key>&step=<n>` address starts that scenario (n from 1)."""
    if st.session_state.get(LINK_READ):
        return
    st.session_state[LINK_READ] = True
    key = st.query_params.get(TOUR_PARAM)
    if key is None:
        return
    step = st.query_params.get(STEP_PARAM, "1")
    for name in (TOUR_PARAM, STEP_PARAM):  # read once: a refresh mid-scenario must not take the step again
        st.query_params.pop(name, None)
    scenario = SCENARIOS.get(key)
    if scenario is None or not re.fullmatch(r"[0-9]{1,3}", step) or not 1 <= int(step) <= len(scenario.steps):
        st.session_state["tour_error"] = (  # the values are not echoed: they would be read as markdown
            "This link asks for a scenario or a step that does not exist. The scenarios are: "
            + ", ".join(f"{k} (steps 1–{len(s.steps)})" for k, s in SCENARIOS.items()) + ".")
        return
    _go(key, int(step) - 1)


def picker() -> None:
    """The sidebar's list of scenarios with a Start button and each one's link."""
    with st.sidebar.expander("Guided scenarios", expanded=ACTIVE not in st.session_state):
        key = st.selectbox("Scenario", list(SCENARIOS), format_func=lambda k: SCENARIOS[k].title, key="tour_choice")
        scenario = SCENARIOS[key]
        st.caption(f"{len(scenario.steps)} step(s) on {scenario.spec}. Link: `?{TOUR_PARAM}={key}`")
        st.button("Start", key="tour_start", on_click=_go, args=(key, 0), icon=":material/play_arrow:",
                  width="stretch")
    if error := st.session_state.pop("tour_error", None):
        st.sidebar.error(error)


def take_pending(handle: ModelHandle | None) -> None:
    """Take the step a button or a link asked for: load the scenario's model (then run
    again), set the step's controls, make its recipe, open its page."""
    pending = st.session_state.pop(PENDING, None)
    if pending is None:
        return
    key, index = pending
    scenario = SCENARIOS[key]
    step = scenario.steps[index]
    if handle is None or handle.spec != scenario.spec:
        if not request_load(LoadRequest(scenario.spec, **opted_in(), **placement_choice())):
            return  # the sidebar shows why
        st.session_state[PENDING] = pending
        st.rerun()
    st.session_state[ACTIVE] = (key, index)
    for widget, value in step.presets(handle).items():
        st.session_state[widget] = value
    if step.recipe is not None:
        try:  # the step's drops are read from the drop sweep, which this visitor may have stopped
            lab = session_lab(handle)
            edits = step.recipe(handle)
        except LayerScopeError as e:
            st.sidebar.error(f"This step's recipe could not be made: {app_message(e)}")
            return
        if list(lab.recipe.edits) != edits:
            recipe = Recipe(handle.fingerprint, edits, model=handle.spec)
            if not change_recipe(f"{scenario.title}: step {index + 1}", lambda progress: lab.apply(recipe, progress)):
                return
    st.switch_page(step.page)


def _outline(keys: list[str]) -> None:
    """Outline the widgets the step set for the class (Streamlit marks each keyed widget's
    container with the class `st-key-<key>`)."""
    if keys:
        names = [re.sub(r"[^A-Za-z0-9_-]", "-", k) for k in keys]  # as Streamlit writes the class
        rules = ",".join(f".st-key-{html.escape(n)}" for n in names)
        st.html(f"<style>{rules}{{outline:3px solid #f4b400;outline-offset:4px;border-radius:6px}}</style>")


def _step_text(scenario: Scenario, index: int, step: Step) -> str:
    return f"**{scenario.title}** · step {index + 1} of {len(scenario.steps)}: {step.text}"


def banner(slot, handle: ModelHandle | None, page_url: str) -> None:
    """Above the page: the active step, what the class should see (computed), and the
    buttons. Drawn after the page ran, so the check reads what the page computed."""
    active = st.session_state.get(ACTIVE)
    if active is None or handle is None:
        return
    key, index = active
    scenario = SCENARIOS[key]
    step = scenario.steps[index]
    with slot.container(border=True):
        st.markdown(_step_text(scenario, index, step))
        if handle.spec != scenario.spec:
            st.warning(f"This scenario runs on {scenario.spec}; {handle.spec} is loaded now.")
        elif page_url != Path(step.page).stem:
            st.info("This step is on another page.")
            st.button("Go to this step's page", key="tour_here", on_click=_go, args=(key, index))
        else:
            _outline(list(step.presets(handle)))
            try:
                lab = session_lab(handle) if step.recipe is not None else None
                check = step.check(handle, lab)
                (st.success if check.passed else st.warning)(f"What you should see: {check.text}",
                                                             icon=":material/check_circle:" if check.passed
                                                             else ":material/help:")
            except Stopped:  # the page shows its notice, with the button that goes on
                pass
            except LayerScopeError as e:
                st.warning(f"The check could not run: {app_message(e)}")
        back, forward, end = st.columns(3)
        back.button("Back", key="tour_back", disabled=index == 0, on_click=_go, args=(key, index - 1),
                    width="stretch", icon=":material/arrow_back:")
        last = index == len(scenario.steps) - 1
        forward.button("Finish" if last else "Next", key="tour_next", type="primary", width="stretch",
                       on_click=_end if last else _go, args=() if last else (key, index + 1),
                       icon=":material/done:" if last else ":material/arrow_forward:")
        end.button("End the scenario", key="tour_end", on_click=_end, width="stretch")
