"""AppTest runs of the Compression lab's quantization controls (issue 13): a format added on
the code LM and on the digits CNN makes the size fall and stacks with pruning in either
order; a group size that does not divide a row is refused with the edit's own message and
leaves the recipe alone; mixed precision shows an allocation and adds its steps; LLM.int8
shows its outlier columns; the real int8 kernel is measured next to the simulation."""

from apptest_helpers import load, new_app, run

PAGE = "views/lab.py"
MIB = 8 * 2**20


def lab_page(spec):
    return run(load(run(new_app()), spec), PAGE)


def choose(at, name):
    at.selectbox(key="lab_method").set_value(name)
    return run(at)


def click(at, key):
    at.button(key=key).click()
    return run(at)


def size_mib(at):
    """The size metric as shown ("6.60 MiB") in MiB, and its delta."""
    metric = next(m for m in at.metric if m.label == "size")
    return float(metric.value.split()[0]), metric.delta


def recipe_lines(at):
    return [m.value.replace("**", "") for m in at.markdown if m.value.startswith("**") and ".** " in m.value[:7]]


def lab_of(at):
    return next(iter(at.session_state["labs"].values()))


def errors(at):
    return [e.value for e in at.error]


def test_int4_on_the_code_lm_shrinks_it_and_stacks_with_pruning_both_ways():
    at = choose(lab_page("zoo:code-lm"), "Quantize weights")
    base, delta = size_mib(at)
    assert delta in (None, "")
    at.selectbox(key="lab_quant_format").set_value("int4")
    run(at)
    assert any("bits per weight" in m.value and "groups of 80" in m.value for m in at.markdown)  # rows of 160
    assert at.get("plotly_chart"), "the layer's histogram with the int4 grid"
    click(at, "lab_add")
    assert not errors(at) and recipe_lines(at) == ["1. quantize int4 (all)"]
    quantized, delta = size_mib(at)
    assert quantized < base / 2 and delta.startswith("-")  # the blocks' weights: 32 -> ~4.3 bits
    assert lab_of(at).current.metrics.size_bits < lab_of(at).base_point.metrics.size_bits
    stored = next(c.value for c in at.caption if c.value.startswith("Stored quantized"))
    assert "24 weight(s) as int4 g80" in stored  # rows of 160 and 640 share groups of 80: one group size

    choose(at, "Magnitude pruning")
    click(at, "lab_add")
    assert recipe_lines(at) == ["1. quantize int4 (all)", "2. magnitude 50% (all, per layer)"]
    after = lab_of(at).current.metrics
    click(at, "lab_up_1")  # pruning first, then quantize
    assert not errors(at) and recipe_lines(at) == ["1. magnitude 50% (all, per layer)", "2. quantize int4 (all)"]
    before = lab_of(at).current.metrics
    assert before.size_bits == after.size_bits < lab_of(at).base_point.metrics.size_bits
    assert before.bits_per_byte != after.bits_per_byte  # another model: the order matters


def test_own_group_size_starts_at_a_size_that_divides_every_row():
    at = choose(lab_page("zoo:code-lm"), "Quantize weights")
    at.selectbox(key="lab_quant_format").set_value("int4")
    run(at)
    at.toggle(key="lab_quant_own_group").set_value(True)
    run(at)
    assert at.number_input(key="lab_quant_group").value == 80  # rows of 160 and 640; int4's default 128 divides neither
    assert not errors(at) and not at.button(key="lab_add").disabled


def test_llm_int8_shows_its_outlier_columns_and_lands_in_the_recipe():
    at = choose(lab_page("zoo:code-lm"), "LLM.int8 outlier split")
    assert at.slider(key="lab_int8_threshold").value == 6.0
    at.toggle(key="lab_int8_show").set_value(True)
    run(at)
    assert any("input columns in all stay in 16-bit" in c.value for c in at.caption)
    click(at, "lab_add")
    assert not errors(at) and recipe_lines(at) == ["1. LLM.int8 threshold 6 (all)"]
    assert size_mib(at)[1].startswith("-")
    assert any("does not quantize activations" in c.value for c in at.caption)  # the export says what it drops


def test_nf4_on_the_digits_cnn_and_a_bad_group_size_is_refused():
    at = choose(lab_page("zoo:digits-cnn"), "Quantize weights")
    base, _ = size_mib(at)
    at.selectbox(key="lab_quant_format").set_value("int4")
    run(at)
    at.toggle(key="lab_quant_own_group").set_value(True)
    run(at)
    at.number_input(key="lab_quant_group").set_value(100)
    run(at)
    assert any(e.startswith("conv1: A group of 100 does not divide rows of length 9") for e in errors(at)), errors(at)
    assert at.button(key="lab_add").disabled and recipe_lines(at) == []
    assert len(lab_of(at).history) == 1  # nothing was applied

    at.toggle(key="lab_quant_own_group").set_value(False)
    at.selectbox(key="lab_quant_format").set_value("nf4")
    run(at)
    assert not errors(at)
    click(at, "lab_add")
    assert recipe_lines(at) == ["1. quantize nf4 (all)"]
    assert size_mib(at)[0] < base and size_mib(at)[1].startswith("-")


def test_calibrated_method_shows_quantease_against_rtn_on_the_cnn():
    at = choose(lab_page("zoo:digits-cnn"), "Quantize weights")
    at.selectbox(key="lab_quant_format").set_value("int4")
    at.radio(key="lab_quant_method").set_value("quantease")
    run(at)
    at.selectbox(key="lab_quant_layer").set_value("fc1")
    run(at)
    shown = {m.label: float(m.value) for m in at.metric if m.label.startswith("layer-output error")}
    assert shown["layer-output error, QuantEase"] < shown["layer-output error, round to nearest"]
    click(at, "lab_add")
    assert not errors(at) and recipe_lines(at) == ["1. quantize int4 QuantEase (all)"]


def test_mixed_precision_allocation_on_the_digits_cnn():
    at = choose(lab_page("zoo:digits-cnn"), "Mixed precision")
    assert at.button(key="lab_add").disabled  # nothing until the sensitivity is computed
    at.slider(key="lab_mp_budget").set_value(20)
    at.toggle(key="lab_mp_go").set_value(True)
    run(at)
    caption = next(c.value for c in at.caption if "Chosen:" in c.value)
    assert "conv1:" in caption and "int4" in caption and "Goal size <=" in caption
    assert at.get("plotly_chart")
    click(at, "lab_add")
    lines = recipe_lines(at)
    assert lines and all(" quantize " in line for line in lines) and not errors(at)
    lab = lab_of(at)
    assert lab.current.metrics.size_bits <= 0.2 * lab.base_point.metrics.size_bits + 1


def test_real_int8_kernel_next_to_the_simulation():
    at = choose(lab_page("zoo:digits-cnn"), "Quantize weights")
    assert at.selectbox(key="lab_quant_format").value == "int8"
    click(at, "lab_quant_kernel")
    assert not errors(at)
    table = next(t.value for t in at.table if "forward (ms)" in t.value.columns)
    assert list(table.iloc[:, 0]) == ["float32 (current model)", "simulated INT8 (this lab)", "torch int8 kernel"]
    assert any("torch's int8 kernel on 2 fully connected layers" in c.value for c in at.caption)


def test_every_format_on_the_digits_cnn_each_replacing_the_last():
    from analysis.compress.quant.formats import FORMATS

    at = choose(lab_page("zoo:digits-cnn"), "Quantize weights")
    base = lab_of(at).base_point.metrics.size_bits
    sizes = {}
    for i, fmt in enumerate(FORMATS):
        at.selectbox(key="lab_quant_format").set_value(fmt)
        run(at)
        click(at, "lab_add" if i == 0 else "lab_replace")
        assert not errors(at) and recipe_lines(at) == [f"1. quantize {fmt} (all)"], (fmt, errors(at))
        sizes[fmt] = lab_of(at).current.metrics.size_bits
    assert all(size < base for size in sizes.values())
    assert sizes["binary"] < sizes["int4"] < sizes["fp6-e3m2"] < sizes["int8"] < base


def test_mixed_precision_for_a_tolerated_drop_keeps_the_sensitive_layers_wider():
    at = choose(lab_page("zoo:digits-cnn"), "Mixed precision")
    at.radio(key="lab_mp_goal").set_value("drop")
    run(at)
    at.number_input(key="lab_mp_drop").set_value(0.0)  # nothing may move: every layer stays int8
    at.toggle(key="lab_mp_go").set_value(True)
    run(at)
    caption = next(c.value for c in at.caption if "Chosen:" in c.value)
    chosen = caption.split("Chosen: ")[1].split(". Goal")[0]
    assert chosen == "conv1: int8, conv2: int8, conv3: int8, fc1: int8, head: int8", caption
    assert "Goal KL(base || model) (nats) <= 0: **not met**" in caption  # even int8 moves the outputs a little
    click(at, "lab_add")
    lines = recipe_lines(at)
    assert len(lines) == 1 and lines[0].startswith("1. quantize int8 (layers ") and not errors(at)
