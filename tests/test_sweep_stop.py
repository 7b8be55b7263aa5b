"""The drop sweep stopped part way (issue 25): what it measured is kept and shown, the rest
listed as not measured, and it resumes where it stopped, to the same numbers as a sweep run
through."""

import pytest

from analysis.redundancy import report as rr
from analysis.redundancy.drops import STOPPED, lm_drop_sweep, stopped_sweep
from lib import data
from ui.cache import batch_key
from ui.progress import STOPPED as STOPPED_STEPS
from ui.store import STORE

from apptest_helpers import new_app, run


class _Stop(Exception):
    pass


def _stopping_after(n, so_far):
    """A bar whose Stop is clicked once `n` drops are measured: the sweep's next report raises."""
    def progress(fraction, message):
        if len(so_far.get("dropped", {})) >= n:
            raise _Stop
    return progress


def test_a_stopped_sweep_keeps_its_drops_and_resumes_to_the_same_numbers(tiny_lm):
    batch = data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=3)
    res = rr.residual_pass(tiny_lm, batch)
    so_far = {}
    with pytest.raises(_Stop):
        lm_drop_sweep(tiny_lm, batch, res, progress=_stopping_after(4, so_far), so_far=so_far)
    partial = stopped_sweep(tiny_lm, so_far)
    assert len(partial.dropped) == 4 and len(partial.not_droppable) == 3 * 3 - 4
    assert set(partial.not_droppable.values()) == {STOPPED}
    told = []
    resumed = lm_drop_sweep(tiny_lm, batch, res, progress=lambda f, m: told.append((f, m)), so_far=so_far)
    measured = [m for _, m in told if m.startswith("dropping") and ":" not in m]
    assert len(measured) == 3 * 3 - 4  # only the drops it had not reached
    assert [f for f, _ in told] == sorted(f for f, _ in told) and told[-1][0] == pytest.approx(1.0)
    whole = lm_drop_sweep(tiny_lm, batch, res)
    assert resumed.dropped.keys() == whole.dropped.keys()
    for drop, metrics in whole.dropped.items():
        assert resumed.dropped[drop].nll == pytest.approx(metrics.nll, rel=1e-6)


def test_the_page_shows_a_stopped_sweep_and_measures_the_rest_on_request():
    from ui.session import LoadRequest, load_base

    at = run(new_app())
    handle = load_base(LoadRequest("zoo:code-lm"))
    at = run(at, "views/redundancy.py")  # the whole page once: the pass and the statistics cached
    key = ("drop_sweep", *batch_key(handle))
    whole = STORE.get(key)
    assert whole is not None and STORE.get(key + ("so far",)) is not None
    so_far = {"base": whole.base, "dropped": dict(list(whole.dropped.items())[:9])}  # blocks and attentions
    STORE._items.pop(key)  # as if the sweep had been stopped after nine modules
    STORE.put(key + ("so far",), so_far)
    at.session_state[STOPPED_STEPS] = {key}
    at = run(at)
    assert [i.value for i in at.info if "stopped after" in i.value] == [
        "The drop sweep was stopped after 9 of 18 modules: what follows shows those, and lists the rest as not "
        "measured."]  # once, though the page reads the sweep again (predicted vs measured drops)
    assert any(STOPPED in m.value for m in [*at.markdown, *at.caption])
    at.button(key="redundancy_resume_sweep").click()
    at = run(at)
    assert not [i for i in at.info if "stopped after" in i.value] and key not in at.session_state[STOPPED_STEPS]
    assert STORE.get(key).dropped.keys() == whole.dropped.keys()
