"""ui.progress.progress_bar: nothing drawn for short work, the latest progress drawn once the
work has run FIRST_DRAW_S, at most one redraw per PROGRESS_INTERVAL_S, and gone on exit."""

import time

import pytest

from ui import progress


class Slot:
    """Records what a page placeholder was asked to show."""

    def __init__(self):
        self.calls = []

    def progress(self, fraction, text):
        self.calls.append(("progress", fraction, text))

    def empty(self):
        self.calls.append(("empty",))

    def container(self):  # the Stop button is drawn in a block in its slot
        return self

    def button(self, label, key, on_click, **kwargs):
        self.calls.append(("button", label, on_click))


@pytest.fixture
def slot(monkeypatch):
    recorder = Slot()
    monkeypatch.setattr(progress.st, "empty", lambda: recorder)
    return recorder


def test_short_work_draws_nothing(slot, monkeypatch):
    monkeypatch.setattr(progress, "FIRST_DRAW_S", 0.3)
    with progress.progress_bar("Work") as update:
        update(0.5, "half")
        update(1.0, "done")
    time.sleep(0.5)  # the timer was cancelled: it draws nothing later either
    assert slot.calls == []


def test_long_work_shows_latest_progress_then_redraws_at_most_each_interval(slot, monkeypatch):
    monkeypatch.setattr(progress, "FIRST_DRAW_S", 0.05)
    monkeypatch.setattr(progress, "PROGRESS_INTERVAL_S", 60)
    with progress.progress_bar("Work") as update:
        update(0.25, "first")
        time.sleep(0.5)  # the timer draws what was reported last
        assert slot.calls == [("progress", 0.25, "Work: first")]
        update(0.5, "second")  # within the interval: not redrawn
        assert len(slot.calls) == 1
        monkeypatch.setattr(progress, "PROGRESS_INTERVAL_S", 0)
        update(0.75, "third")
        assert slot.calls[-1] == ("progress", 0.75, "Work: third")
    assert slot.calls[-1] == ("empty",)


def test_bar_is_removed_when_the_work_fails(slot, monkeypatch):
    monkeypatch.setattr(progress, "FIRST_DRAW_S", 0.05)
    with pytest.raises(ValueError):
        with progress.progress_bar("Work"):
            time.sleep(0.5)
            raise ValueError("bad input")
    assert slot.calls == [("progress", 0.0, "Work"), ("empty",)]


def test_the_time_left_comes_from_the_pace_so_far():
    assert progress.time_left(0.25, 10.0) == " · about 30 s left"  # 10 s for a quarter: 30 s for the rest
    assert progress.time_left(0.1, 30.0) == " · about 4 min left"
    assert progress.time_left(0.02, 10.0) == "" and progress.time_left(0.5, 1.0) == ""  # no pace to go by yet
    assert progress.time_left(0.9, 20.0) == ""  # a few seconds left: not worth a number


def test_a_stoppable_bar_draws_its_stop_button_once_with_the_bar_and_removes_it(slot, monkeypatch):
    monkeypatch.setattr(progress, "FIRST_DRAW_S", 0.05)
    monkeypatch.setattr(progress, "PROGRESS_INTERVAL_S", 0)
    stopped = []
    with progress.progress_bar("Work", on_stop=lambda: stopped.append(True)) as update:
        time.sleep(0.5)
        update(0.5, "half")
    buttons = [c for c in slot.calls if c[0] == "button"]
    assert len(buttons) == 1 and buttons[0][1] == "Stop" and slot.calls[-2:] == [("empty",), ("empty",)]
    buttons[0][2]()  # what a click calls before the page runs again
    assert stopped == [True]


def test_a_resumed_step_takes_its_pace_from_where_it_started():
    assert progress.time_left(0.75, 10.0, start=0.5) == " · about 10 s left"  # a quarter in 10 s: 10 s to go
    assert progress.time_left(0.52, 10.0, start=0.5) == ""  # too little done since it went on
