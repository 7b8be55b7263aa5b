"""LayerScope: look inside a network layer by layer, and cut it down while watching the cost.

    streamlit run app.py
"""

from __future__ import annotations

import streamlit as st

from lib.models import zoo_names
from lib.zoo import ZOO
from ui.session import DEFAULT_SPEC, LoadRequest, current_handle, guard, recipe, request_load

st.set_page_config(page_title="LayerScope", page_icon=":material/biotech:", layout="wide")


def model_picker() -> None:
    """Sidebar: bundled models, or a hub name / local folder, with the safety opt-ins."""
    st.sidebar.header("Model")
    loaded = st.session_state.get("load_request")
    options = [f"zoo:{n}" for n in zoo_names()]
    current = loaded.spec if loaded is not None and loaded.spec in options else DEFAULT_SPEC
    choice = st.sidebar.selectbox(
        "Bundled model", options, index=options.index(current),
        format_func=lambda s: f"{s}  ({ZOO[s[4:]].kind})", key="zoo_choice")
    typed = st.sidebar.text_input("…or a Hugging Face name / local folder",
                                  placeholder="gpt2  or  /path/to/checkpoint", key="typed_spec")
    with st.sidebar.expander("Loading options"):
        allow_pickle = st.checkbox("Allow pickled checkpoints (.bin/.pt)", key="allow_pickle",
                                   help="Pickle files can run code when loaded. Only for sources you trust.")
        trust_code = st.checkbox("Trust remote code", key="trust_code",
                                 help="Runs Python code shipped with the model. Only for sources you trust.")
    if st.sidebar.button("Load", type="primary", width="stretch"):
        spec = typed.strip() or choice
        request_load(LoadRequest(spec, allow_pickle, trust_code))
    if "load_error" in st.session_state:
        st.sidebar.error(st.session_state["load_error"])


model_picker()
handle = current_handle()
if handle is not None:
    st.sidebar.caption(f"Loaded: **{handle.spec}** · {handle.n_params:,} parameters")
recipe_slot = st.sidebar.empty()  # filled after the page ran, so edits made there show at once

pages = [
    st.Page("views/model.py", title="Model", icon=":material/info:", default=True),
    st.Page("views/redundancy.py", title="Redundancy", icon=":material/layers:"),
    st.Page("views/glossary.py", title="Glossary", icon=":material/menu_book:"),
]
try:
    with guard():  # every error a user can cause ends in st.error, never a traceback
        st.navigation(pages).run()
finally:  # also when the page stopped early
    if handle is not None and (edits := recipe(handle).edits):
        recipe_slot.caption(f"Recipe: {len(edits)} edit(s) — " + ", ".join(e.label for e in edits))
