"""AppTest runs of the lab's "What the recipe changed" section and the sidebar's verified
badge: intervals with significance, flipped answers, the KL strip and the internals side by
side after two dropped blocks; flipped images on the CNN; PSNR drops on the denoiser."""

from __future__ import annotations

import pytest

from apptest_helpers import load, new_app, run

PAGE = "views/lab.py"


def lab_page(spec, typed=False):
    return run(load(run(new_app()), spec, typed=typed), PAGE)


def add_drop(at, layer):
    at.selectbox(key="lab_method").set_value("Drop a block, attention or MLP")
    run(at)
    at.radio(key="lab_drop_kind").set_value("block")
    at.selectbox(key="lab_drop_layer").set_value(layer)
    run(at)
    at.button(key="lab_add").click()
    return run(at)


def texts(at):
    return " ".join([m.value for m in at.markdown] + [c.value for c in at.caption])


def html_blocks(at):
    return [e.proto.body for e in at.get("html")]


@pytest.mark.slow
def test_two_dropped_blocks_show_what_changed_on_code_lm():
    at = lab_page("zoo:code-lm")
    assert "Flipped answers" not in texts(at)  # nothing changed yet
    add_drop(at, 2)
    add_drop(at, 3)
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    assert list(table["metric"])[:3] == ["bits per byte", "perplexity", "loss (nats/token)"]
    row = table.iloc[0]
    assert row["significant"] == "yes, worse" and " – " in row["edited interval"]
    assert "percentile bootstrap over the" in texts(at) and "p99" in texts(at)
    assert "Flipped answers" in texts(at)
    html = html_blocks(at)
    assert any("<mark" in h and "edited predicts" in h for h in html)  # flips in their text
    assert any("KL " in h and "rgba(214,39,40" in h for h in html)  # the KL strip
    assert at.selectbox(key="lab_kl_window").value is not None
    assert "Removed: block 2, block 3" in texts(at)
    assert any("Head roles, base and edited" in m.value for m in at.markdown)
    roles = at.dataframe[1].value
    assert set(roles.columns) >= {"head", "role", "base score", "edited score"}
    assert (roles[roles["head"].str.startswith(("2.", "3."))]["edited score"] == "–").all()
    badge = " ".join(c.value for c in at.sidebar.caption)
    assert "verified: outputs match to" in badge


def test_internals_that_would_take_long_start_off_with_their_estimate(monkeypatch):
    from analysis.compress import compare as cmp

    at = lab_page("zoo:induction-2l")
    monkeypatch.setattr(cmp, "internals_in_forwards", lambda handle, batch: 1e5)  # a forward's seconds x 1e5
    add_drop(at, 1)
    assert not at.exception and not at.error
    toggle = at.toggle(key="lab_internals")
    assert toggle.value is False and "min after each change here)" in toggle.label
    assert "Head roles, base and edited" not in texts(at)
    toggle.set_value(True)
    run(at)
    assert "Head roles, base and edited" in texts(at) and not at.exception


def test_flipped_images_on_the_digits_cnn():
    at = lab_page("zoo:digits-cnn")
    at.selectbox(key="lab_method").set_value("Bypass a stage")
    run(at)
    at.button(key="lab_add").click()
    run(at)
    assert not at.exception and not at.error
    assert "Flipped answers" in texts(at) and "images" in texts(at)
    assert "verified: outputs match to" in " ".join(c.value for c in at.sidebar.caption)


def test_psnr_drops_on_the_denoiser():
    at = lab_page("zoo:digits-denoiser")
    at.button(key="lab_add").click()  # magnitude 50 %
    run(at)
    assert not at.exception and not at.error
    assert "The images whose PSNR fell most" in texts(at)
    assert any(m.label == "PSNR change" for m in at.metric)


@pytest.mark.parametrize("spec", ["zoo:code-lm", "zoo:induction-2l", "zoo:digits-cnn", "zoo:digits-denoiser", None])
def test_the_verified_badge_shows_on_every_bundled_model_and_a_folder(spec, tmp_path):
    if spec is None:  # a random-weight Llama-shaped folder, loaded as a user's
        from tools.families import save_tiny

        spec = str(save_tiny("llama", tmp_path / "llama"))
    at = load(run(new_app()), spec, typed=not spec.startswith("zoo:"))
    badge = [c.value for c in at.sidebar.caption if "outputs match" in c.value or "not verified" in c.value]
    assert len(badge) == 1 and "verified: outputs match to" in badge[0], [c.value for c in at.sidebar.caption]
    assert not at.sidebar.warning
