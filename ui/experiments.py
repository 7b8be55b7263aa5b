"""This browser's experiments: the visitor id that keeps one visitor's history apart from
another's, the shared journal (`analysis.compress.journal`), and storing what the lab
measured.

There are no accounts. A visitor is a random token made on the first visit and kept in the
page's address (`?v=...`, written by `ui.links`): a refresh keeps it, a new browser without
it gets a new one. Whoever has an address with the token sees that visitor's experiments; the
links the app offers to share leave it out.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any, Callable, TypeVar

import streamlit as st

from analysis.compress.history import LabPoint
from analysis.compress.journal import (
    FILE_NAME,
    VISITOR,
    Experiment,
    Journal,
    JournalError,
    data_folder,
    history_points,
)
from analysis.compress.lab import Lab

VISITOR_PARAM = "v"
T = TypeVar("T")


def new_visitor() -> str:
    return secrets.token_urlsafe(12)  # 16 characters, 96 random bits


def visitor() -> str:
    """This session's visitor id: the one in the address when it is well formed, else a new one
    (kept for the session; `ui.links` writes it back to the address)."""
    if "visitor" not in st.session_state:
        given = st.query_params.get(VISITOR_PARAM)
        if given is not None and not VISITOR.fullmatch(given):
            st.session_state["link_notes"] = st.session_state.get("link_notes", []) + [
                "The visitor id in this address is not one LayerScope makes; this browser got a new one "
                "(an empty history)."]
            given = None
        st.session_state["visitor"] = given or new_visitor()
    return st.session_state["visitor"]


@st.cache_resource(show_spinner=False)
def _open(path: str) -> Journal:
    return Journal(path)


def journal() -> Journal | None:
    """The experiments database (one per data folder, shared by every session), or None when it
    cannot be used: the reason is kept for the lab page (`journal_problem`)."""
    try:
        return _open(str(data_folder() / FILE_NAME))
    except JournalError as e:
        st.session_state["journal_error"] = str(e)
        return None


def journal_problem() -> str | None:
    """Why the history is not being saved (None while it is)."""
    return st.session_state.get("journal_error")


def _call(what: str, default: Any = None, **kwargs: Any) -> Any:
    """`journal().what(**kwargs)`, or `default` when the journal cannot be used (a broken disk
    must not take the lab down: the page says the history is not saved)."""
    book = journal()
    if book is None:
        return default
    try:
        result = getattr(book, what)(**kwargs)
    except JournalError as e:
        st.session_state["journal_error"] = str(e)
        return default
    st.session_state.pop("journal_error", None)
    return result


def record_new(lab: Lab) -> None:
    """Store each point of `lab`'s history that is not stored yet, or whose numbers changed
    since (timed again), except those the visitor forgot (unless current again). Called once
    per run, after the page: a change made in the run is stored before the next one starts."""
    fingerprint = lab.base.fingerprint
    stored: dict[str, LabPoint] = st.session_state.setdefault("journal_stored", {}).setdefault(fingerprint, {})
    forgotten: set[str] = st.session_state.setdefault("journal_forgotten", {}).setdefault(fingerprint, set())
    forgotten.discard(lab.current.digest)
    for point in list(lab.history):
        if point.digest not in forgotten and stored.get(point.digest) is not point:
            if _call("record", visitor=visitor(), spec=lab.base.spec, fingerprint=fingerprint,
                     point=point, base=lab.base_point.metrics) is None:
                return  # the journal cannot be used: try again next run
            stored[point.digest] = point


def stored(lab: Lab) -> list[Experiment]:
    """This visitor's stored experiments on `lab`'s base model (none without a journal)."""
    return _call("experiments", [], visitor=visitor(), fingerprint=lab.base.fingerprint)


def lab_history(lab: Lab) -> tuple[list[LabPoint], list[Experiment]]:
    """The history the lab page draws (this visitor's stored recipes and this session's, base
    first, steps renumbered) and the stored rows it came from."""
    record_new(lab)  # what this run changed is drawn too
    rows = stored(lab)
    return history_points(rows, lab.history, lab.base_point, lab.current, journal_problem() is not None), rows


def current_row(lab: Lab) -> int | None:
    """The stored row of the lab's current recipe for this visitor (None without one)."""
    record_new(lab)
    return _call("row_id", visitor=visitor(), fingerprint=lab.base.fingerprint, digest=lab.current.digest)


def noting_export(lab: Lab, make: Callable[[], T], file_name: str) -> Callable[[], T]:
    """`make` (a download's deferred data), which also notes in the journal that `file_name`
    was downloaded from the lab's current recipe. Streamlit calls it when the button is
    clicked, outside the script run: it reads nothing of the session then."""
    book, who, fingerprint, digest = journal(), visitor(), lab.base.fingerprint, lab.current.digest

    def made() -> T:
        data = make()
        if book is not None:
            try:
                book.mark_exported(who, fingerprint, digest, file_name)
            except JournalError as e:  # the file matters more than the note: the download goes on
                logging.getLogger(__name__).warning("The export of %s was not noted in the journal: %s", file_name, e)
        return data

    return made


def forget(lab: Lab, row_id: int, digest: str) -> bool:
    """Delete one of this visitor's stored rows of `lab`'s model (recipe `digest`); this
    session does not store it again unless it becomes current again."""
    st.session_state.setdefault("journal_forgotten", {}).setdefault(lab.base.fingerprint, set()).add(digest)
    return bool(_call("delete", False, visitor=visitor(), row_id=row_id))


def shared_recipe(row_id: int, digest: str) -> str | None:
    return _call("shared_recipe", row_id=row_id, digest=digest)
