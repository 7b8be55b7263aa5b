"""A visitor raises a language model's evaluation batch on the Model page (issue 25): the
baseline, its intervals, the Redundancy page and the lab (with the recipe carried over) use
the larger batch; other models keep theirs; a batch the held-out text cannot fill is refused."""


from lib import data
from lib.models import load_model

from apptest_helpers import load, new_app, run


def windows_input(at):
    return next(w for w in at.number_input if w.label == "Evaluation windows")


def test_raising_the_batch_reaches_every_page_and_keeps_the_recipe():
    auto = len(data.default_batch(load_model("zoo:code-lm")).tokens)
    at = run(new_app())
    assert windows_input(at).value == auto
    before = next(c.value for c in at.caption if c.value.startswith("Evaluation set:"))
    at = run(at, "views/lab.py")
    at.button(key="lab_add").click()  # the default method: magnitude 50 %
    at = run(at)
    edits = next(iter(at.session_state["labs"].values())).current.edits
    assert edits
    at = run(at, "views/model.py")
    windows_input(at).set_value(auto + 4)
    at = run(at)
    after = next(c.value for c in at.caption if c.value.startswith("Evaluation set:"))
    assert f"{auto + 4}x" in after and f"{auto}x" in before
    assert not at.error
    at = run(at, "views/lab.py")
    labs = at.session_state["labs"]
    assert len(labs) == 1  # one lab per model: the one on the old batch went
    lab = next(iter(labs.values()))
    assert len(lab.batch.tokens) == auto + 4 and lab.current.edits == edits
    at = run(at, "views/redundancy.py")
    assert not at.error and not at.exception
    at = load(at, "zoo:digits-cnn")  # an image model's set is fixed: no control
    assert not [w for w in at.number_input if w.label == "Evaluation windows"]


def test_a_batch_the_text_cannot_fill_is_refused_and_the_batch_kept(monkeypatch):
    at = run(new_app())
    auto = windows_input(at).value
    before = next(c.value for c in at.caption if c.value.startswith("Evaluation set:"))
    real = data.code_batch

    def short_text(tokenizer, seq_len=128, n_windows=16):
        if n_windows > auto + 1:
            raise data.DataError(f"Held-out text gives only {auto + 1} windows of {seq_len - 1} tokens.")
        return real(tokenizer, seq_len, n_windows)

    monkeypatch.setattr(data, "code_batch", short_text)
    windows_input(at).set_value(auto + 2)
    at = run(at)
    assert [e.value for e in at.error] == [f"Held-out text gives only {auto + 1} windows of 255 tokens."]
    assert next(c.value for c in at.caption if c.value.startswith("Evaluation set:")) == before
    assert windows_input(at).value == auto  # the box shows the batch in use
