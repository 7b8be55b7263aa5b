"""Helpers for Streamlit AppTest runs of app.py."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

TIMEOUT = 300


def new_app() -> AppTest:
    at = AppTest.from_file("../app.py", default_timeout=TIMEOUT)
    return at


def run(at: AppTest, page: str | None = None) -> AppTest:
    """Run app.py (sidebar included) and then `page`.

    AppTest otherwise reruns only the page script a multipage app finished on,
    skipping app.py and its sidebar; clearing the finished page hash makes it run the
    entry point the way a browser session does.
    """
    at._finished_page_script_hash = ""
    if page is not None:
        at.switch_page(page)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def load(at: AppTest, spec: str, typed: bool = False) -> AppTest:
    """Load `spec` the way a user does: pick it in the list (loads at once) or type it
    into the name/folder box and press Enter."""
    if typed:
        at.text_input(key="typed_spec").input(spec)
    else:
        at.selectbox(key="zoo_choice").set_value(spec)
    return run(at)
