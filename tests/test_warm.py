"""The warm server (`ui.warm`): after the warm-up, a first visit of every page reads what
it computed (nothing new is computed); which models it warms; its progress and problems."""

from __future__ import annotations

import time

import pytest

import ui.cache
from lib import data
from lib.errors import CapabilityError, LayerScopeError
from lib.models import zoo_names
from ui import warm
from ui.session import DEFAULT_SPEC, LoadRequest
from ui.store import STORE

from apptest_helpers import new_app, run

VIEWS = ("views/model.py", "views/redundancy.py", "views/channels.py", "views/interpreter.py",
         "views/representations.py", "views/lab.py")


@pytest.mark.parametrize("spec", ["zoo:induction-2l", "zoo:digits-cnn"])  # a language model and an image model
def test_every_page_reads_what_the_warm_up_computed(spec, monkeypatch):
    assert warm.warm([spec]) == []
    handle = warm.load_base(LoadRequest(spec))
    assert ("drop_sweep", handle.fingerprint, data.default_batch(handle).digest) in STORE._items  # it computed

    computed = []  # what a page computes from here on: STORE misses and st.cache_data misses
    put = STORE.put
    monkeypatch.setattr(STORE, "put", lambda key, value: (computed.append(key), put(key, value)))
    for name in ("metrics_from_outputs", "verify", "spread"):  # the bodies of ui.cache's st.cache_data functions
        original = getattr(ui.cache, name)
        monkeypatch.setattr(ui.cache, name, lambda *a, _f=original, _n=name, **k: (computed.append(_n), _f(*a, **k))[1])
    monkeypatch.setattr(ui.cache.data, "default_batch",
                        lambda *a, _f=ui.cache.data.default_batch, **k: (computed.append("batch"), _f(*a, **k))[1])

    at = new_app()
    at.session_state["load_request"] = LoadRequest(spec)  # as if picked in the sidebar: no default model
    for view in VIEWS:
        run(at, view)
        assert not at.error, (view, [e.value for e in at.error])
        assert [k for k in computed if handle.fingerprint in k or isinstance(k, str)] == [], view


def test_a_page_the_warm_up_skipped_is_computed_on_its_visit(monkeypatch):
    """The check above can fail: with the Channels step left out, its visit computes."""
    monkeypatch.setitem(warm.PAGES, "Channels", lambda handle: None)
    spec = "zoo:induction-2l"
    handle = warm.load_base(LoadRequest(spec))
    for key in [k for k in STORE._items if k[0].startswith("channels.") and k[1] == handle.fingerprint]:
        del STORE._items[key]
    warm.warm([spec])
    computed = []
    put = STORE.put
    monkeypatch.setattr(STORE, "put", lambda key, value: (computed.append(key[0]), put(key, value)))
    at = new_app()
    at.session_state["load_request"] = LoadRequest(spec)
    run(at, "views/channels.py")
    assert "channels.circuits" in computed and "channels.intervention" in computed


def test_bundled_models_default_first_and_nothing_else():
    everything = warm.bundled_specs("1")
    assert everything[0] == DEFAULT_SPEC and sorted(everything) == sorted(f"zoo:{n}" for n in zoo_names())
    assert warm.bundled_specs("induction-2l, zoo:code-lm") == ["zoo:code-lm", "zoo:induction-2l"]
    with pytest.raises(LayerScopeError, match="gpt2.*not bundled models"):
        warm.bundled_specs("induction-2l,gpt2")


def _finished(warmer: warm.Warmer) -> warm.Warmer:
    deadline = time.time() + 60
    while not warmer.finished and time.time() < deadline:
        time.sleep(0.01)
    assert warmer.finished
    return warmer


def test_progress_and_what_could_not_be_warmed(monkeypatch):
    seen = []

    def refuses(handle):
        raise CapabilityError("not for this model")  # the page says the same: not a problem

    def breaks(handle):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(warm, "PAGES", {"A": lambda h: seen.append(("A", h)), "B": refuses, "C": breaks})
    monkeypatch.setattr(warm, "load_base", lambda request: request.spec)
    monkeypatch.setattr(warm.interpreter, "working_copy", lambda handle: None)
    warmer = warm.Warmer()
    assert warmer.status() == "Warming: 0 of 0 done (now: )."
    assert warmer.start(["zoo:code-lm", "zoo:digits-cnn"])
    assert not warmer.start(["zoo:digits-cnn"])  # one warm-up per process
    _finished(warmer)
    assert warmer.done == warmer.total == 6
    assert seen[:2] == [("A", "zoo:code-lm"), ("A", "zoo:digits-cnn")] and seen[2:] == [("A", "zoo:code-lm")]
    assert warmer.problems == ["C · zoo:code-lm: out of memory", "C · zoo:digits-cnn: out of memory"]
    assert warmer.status().startswith("Warm: every page of 2 bundled model(s) computed in ")
    assert "Not warmed: C · zoo:code-lm: out of memory" in warmer.status()


def test_the_environment_starts_it_once(monkeypatch):
    started = []
    monkeypatch.setattr(warm.Warmer, "start", lambda self, specs: (started.append(specs), True)[1])
    monkeypatch.setattr(warm, "WARMER", warm.Warmer())
    monkeypatch.delenv(warm.ENV, raising=False)
    assert not warm.start_from_environment() and started == []
    monkeypatch.setenv(warm.ENV, "0")
    assert not warm.start_from_environment() and started == []
    monkeypatch.setenv(warm.ENV, "induction-2l")
    assert warm.start_from_environment() and started == [["zoo:induction-2l"]]
    monkeypatch.setattr(warm, "WARMER", warm.Warmer())
    monkeypatch.setenv(warm.ENV, "gpt2")
    assert not warm.start_from_environment()
    assert "not bundled models" in warm.WARMER.problems[0] and len(started) == 1
