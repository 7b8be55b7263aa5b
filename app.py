"""LayerScope: look inside a network layer by layer, and cut it down while watching the cost.

    streamlit run app.py
"""

from __future__ import annotations

import streamlit as st

from lib.devices import DEVICES, DTYPES, available
from lib.errors import LayerScopeError
from lib.models import zoo_names
from lib.zoo import ZOO
from ui import links, presenter, tour
from ui.cache import verified
from ui.glossary import GLOSSARY
from ui.session import (
    DEFAULT_SPEC,
    OPT_INS,
    LoadRequest,
    app_message,
    current_handle,
    current_lab,
    guard,
    opted_in,
    placement_choice,
    request_load,
)

st.set_page_config(page_title="LayerScope", page_icon=":material/biotech:", layout="wide")


def _load_from(key: str) -> None:
    """Widget callback: load the model named in widget `key` (the list or the text box)."""
    spec = (st.session_state.get(key) or "").strip()
    if spec:
        request_load(LoadRequest(spec, **opted_in(), **placement_choice()))


def model_picker() -> None:
    """Sidebar: a bundled model loads as soon as it is chosen; a hub name or folder loads
    on Enter (or the button); the sidebar always says what is loaded."""
    st.sidebar.header("Model")
    loaded = st.session_state.get("load_request")
    spec = loaded.spec if loaded is not None else DEFAULT_SPEC
    options = [f"zoo:{n}" for n in zoo_names()]
    st.session_state["zoo_choice"] = spec if spec in options else None  # the list shows what is loaded
    st.sidebar.selectbox(
        "Bundled model", options, key="zoo_choice", on_change=_load_from, args=("zoo_choice",),
        placeholder="(a model from a folder or the hub is loaded)",
        help="\n".join(f"- **{s}**: {ZOO[s[4:]].kind}" for s in options))  # kinds here: the names fit the sidebar
    st.sidebar.text_input("…or a Hugging Face name / local folder", key="typed_spec", max_chars=1000,
                          placeholder="gpt2  or  /path/to/checkpoint", on_change=_load_from, args=("typed_spec",),
                          help="Press Enter to load it.")
    st.sidebar.button("Load this name or folder", on_click=_load_from, args=("typed_spec",), width="stretch")
    with st.sidebar.expander("Loading options"):  # device, precision, and the opt-ins the server offers
        st.selectbox("Device", [d for d in DEVICES if d == "auto" or available(d)], key="load_device",
                     help="auto: a CUDA GPU, then Apple MPS, then the CPU. Applies to the next model loaded.")
        st.selectbox("Precision", list(DTYPES), key="load_dtype",
                     help="auto keeps the checkpoint's own (a bfloat16 checkpoint stays bfloat16, half the memory "
                          "of float32). Statistics and metrics are accumulated in float32 either way. Applies to "
                          "the next model loaded.")
        for opt_in in OPT_INS:
            if opt_in.offered():
                st.checkbox(opt_in.label, key=opt_in.key, help=opt_in.help)
            else:
                st.caption(opt_in.note)
    if "load_error" in st.session_state:  # shown once, right after the attempt that failed
        st.sidebar.error(st.session_state.pop("load_error"))


page = st.navigation([
    st.Page("views/model.py", title="Model", icon=":material/info:", default=True),
    st.Page("views/redundancy.py", title="Redundancy", icon=":material/layers:"),
    st.Page("views/channels.py", title="Channels", icon=":material/hub:"),
    st.Page("views/interpreter.py", title="Interpreter", icon=":material/functions:"),
    st.Page("views/representations.py", title="Representations", icon=":material/psychology:"),
    st.Page("views/lab.py", title="Compression lab", icon=":material/content_cut:"),
    st.Page("views/glossary.py", title="Glossary", icon=":material/menu_book:"),
])  # drawn first: the menu shows before the model loads
links.restore()  # once per session: the address's model and recipe
tour.from_link()  # once per session: a scenario the address names
model_picker()
tour.picker()
handle = current_handle()
tour.take_pending(handle)  # a scenario step asked for: its model, controls, recipe and page
if handle is not None:
    st.sidebar.caption(f"Loaded: **{handle.spec}** · {handle.n_params:,} parameters")
    try:
        # Right after a load (65 s on the Llama-1B shape in a browser walk on a shared machine; the
        # page showed nothing meanwhile). Cached afterwards, and a cached call draws no spinner.
        with st.spinner(f"Preparing {handle.spec}: hashing its weights, making its evaluation batch and "
                        "checking its hooked forward against the plain one ..."):
            check = verified(handle)
        (st.sidebar.caption if check.ok else st.sidebar.warning)(
            (":material/verified: " if check.ok else "") + check.text(), help=GLOSSARY["verified_outputs"])
    except Exception as e:  # noqa: BLE001 - a hooked path that cannot run: say so here, the pages that hook will too
        why = app_message(e) if isinstance(e, LayerScopeError) else f"the hooked forward failed ({type(e).__name__})"
        st.sidebar.caption(f"Outputs not verified: {why}", help=GLOSSARY["verified_outputs"])
presenter.sidebar()  # large text for a projector; the warm server's progress
recipe_slot = st.sidebar.empty()  # filled after the page ran, so edits made there show at once

tour_slot = st.container()  # the scenario's step, drawn once the page has computed what it checks
try:
    with guard():  # every error a user can cause ends in st.error, never a traceback
        page.run()
finally:  # also when the page stopped early
    with guard():
        tour.banner(tour_slot, handle, page.url_path)
    links.reflect(handle)  # what the lab measured goes to the journal; the view to the address
    presenter.warm_after_first_page()  # LAYERSCOPE_WARM=1: once this page is drawn
    lab = current_lab(handle) if handle is not None else None
    if lab is not None and (edits := lab.current.edits):
        recipe_slot.caption(f"Recipe: {len(edits)} edit(s) — " + ", ".join(e.label for e in edits))
