"""Widgets that keep their value across pages. Streamlit forgets a widget's state after a run
that does not draw it (another page, another method of the lab), so a choice made there was
lost on the way back. `recall` gives a widget its last value back before it is drawn; `keep`
notes the value it was drawn with. The values live in a dict of this visitor's session state
(`memory`: a part of the app that clears its own choices keeps them in a dict of its own)."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import streamlit as st

T = TypeVar("T")
MEMORY = "widget_memory"


def recall(key: str, fits: Callable[[Any], bool] = lambda value: True, memory: str = MEMORY) -> bool:
    """Give widget `key` back the value it had when last drawn, if that still fits. True when
    the widget has its value in the session state, so it must be drawn without a default of
    its own (Streamlit warns when it has both)."""
    kept = st.session_state.setdefault(memory, {})
    if key not in st.session_state and key in kept and fits(kept[key]):
        st.session_state[key] = kept[key]
    return key in st.session_state


def keep(key: str, value: T, memory: str = MEMORY) -> T:
    """Note `value` as widget `key`'s, for `recall`; returns it."""
    st.session_state.setdefault(memory, {})[key] = value
    return value
