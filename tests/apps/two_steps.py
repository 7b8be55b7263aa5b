"""A page of two stoppable steps for tests/test_browser_stop.py: a short one at the top and
a long one at the end of a page taller than the window, each under `ui.progress.stored`."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # streamlit puts only this folder on the path

import streamlit as st  # noqa: E402

from ui.progress import Stopped, stored  # noqa: E402


def steps(seconds: float):
    def compute(progress):
        n = int(seconds * 10)
        for i in range(n):
            time.sleep(0.1)
            progress(i / n, f"{i} of {n}")
        return seconds
    return compute


st.title("Two steps")
try:
    stored(("two_steps", "first"), steps(3), "First step", stop="Nothing of it is kept.")
    st.markdown("\n\n".join(f"Line {i} between the steps." for i in range(60)))
    stored(("two_steps", "second"), steps(120), "Second step", stop="Nothing of it is kept.")
except Stopped:
    st.stop()
st.write("Both steps finished.")
