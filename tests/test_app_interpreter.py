"""AppTest runs of the Interpreter page: the exact linear picture of one input on the digits
CNN, the denoiser and a language model, with the reconstruction error always shown."""

import pytest

from apptest_helpers import load, new_app, run

PAGE = "views/interpreter.py"


def interpreter_page(spec, typed=False):
    return run(load(run(new_app()), spec, typed=typed), PAGE)


def errors(at):
    return [e.value for e in at.error]


def metric(at, label):
    return next(m.value for m in at.metric if m.label == label)


def charts(at):
    return len(at.get("plotly_chart"))


def captum_methods(at):
    """The captum table's methods; a table (not a dataframe), so long explanations wrap in full."""
    assert not at.dataframe
    return list(at.table[0].value["method"])


def test_digits_cnn_shows_votes_bias_svd_and_captum():
    at = interpreter_page("zoo:digits-cnn")
    assert at.title[0].value == "Linear interpreter" and not errors(at)
    assert float(metric(at, "reconstruction error")) < 1e-9
    assert at.subheader[0].value == "How each class votes"
    assert charts(at) == 5  # input, vote maps, input-vs-bias bars, SVD gallery, captum maps
    assert captum_methods(at) == ["exact (x0 ⊙ A, or J · e)", "Saliency", "InputXGradient", "IntegratedGradients",
                                  "DeepLift"]
    assert any("bias alone accounts for" in c.value for c in at.caption)
    predicted = at.selectbox[0].value
    at.slider[0].set_value(5)
    at.radio[0].set_value("rows")
    run(at)
    assert not errors(at) and float(metric(at, "reconstruction error")) < 1e-9
    at.selectbox[0].set_value((predicted + 1) % 10)
    run(at)
    assert f"class {(predicted + 1) % 10}" in at.subheader[-1].value


def test_denoiser_shows_basis_images_for_an_output_pixel():
    at = interpreter_page("zoo:digits-denoiser")
    assert not errors(at) and float(metric(at, "reconstruction error")) < 1e-9
    assert "Basis images of the map" in [s.value for s in at.subheader]
    at.number_input[0].set_value(5)
    at.number_input[1].set_value(2)
    at.radio[0].set_value("rows")
    run(at)
    assert not errors(at) and at.subheader[-1].value.endswith("pixel (5, 2)")


@pytest.fixture(scope="module")
def lm_page(tiny_gpt2_dir):
    return interpreter_page(str(tiny_gpt2_dir), typed=True)


def test_language_model_token_strip_and_logit_difference(lm_page):
    at = lm_page
    assert not errors(at) and float(metric(at, "reconstruction error")) < 1e-6
    assert captum_methods(at)[-1] == "DeepLift"  # listed as not applicable, with the reason
    at.radio[0].set_value("difference")
    run(at)
    assert not errors(at) and "−" in at.subheader[0].value  # "logit “a” − logit “b”"
    at.text_area[0].input("import os\nprint(os.getcwd())")
    run(at)
    assert not errors(at) and float(metric(at, "reconstruction error")) < 1e-6


def test_an_empty_prompt_is_explained_and_the_model_stays(lm_page):
    at = lm_page
    at.text_area[0].input("   ")
    run(at)
    assert any("empty" in e for e in errors(at))
    at.text_area[0].input("x = 1")
    run(at)
    assert not errors(at) and float(metric(at, "reconstruction error")) < 1e-6


def test_unknown_words_and_a_long_prompt_are_named_on_the_induction_model():
    at = interpreter_page("zoo:induction-2l")
    at.text_area[0].input("t5 t9 hello t5")
    run(at)
    assert any("“hello”" in w.value for w in at.warning)  # fed as BOS: said next to the result
    at.text_area[0].input(" ".join(f"t{i % 40}" for i in range(600)))
    run(at)
    assert any("tokens were dropped" in i.value for i in at.info) and not errors(at)
