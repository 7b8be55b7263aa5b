"""The lab's quantization methods (`analysis.compress.quant`, issue 13): formats, the
LLM.int8 outlier split and mixed precision. Each shows what it will do to one layer (or to
every layer) before it is added; for INT8, torch's real int8 kernel is measured beside it."""

from __future__ import annotations

import dataclasses

import streamlit as st

from analysis.compress.edits import Edit
from analysis.compress.prune.pruning import scoped_layers
from analysis.compress.quant import plots as plots_quant
from analysis.compress.quant.calibration import compare_methods
from analysis.compress.quant.formats import FORMATS, SCALE_BITS, common_group, group_columns
from analysis.compress.quant.kernels import int8_kernel_comparison, simulated_int8
from analysis.compress.quant.mixed_precision import Allocation, Sensitivity, allocate, drop_label, sensitivity
from analysis.compress.quant.quantize import (
    ACTIVATION_FORMATS,
    LLMInt8,
    Quantize,
    find_outliers,
    group_for,
    layer_histogram,
)
from lib import data
from lib.errors import LayerScopeError
from lib.handle import ModelHandle
from lib.metrics import model_inputs
from lib.progress import Progress
from ui.cache import eval_batch
from ui.glossary import GLOSSARY
from ui.lab.methods import LM, LM_AND_IMAGES, method, scope_controls
from ui.progress import NOT_KEPT, Stopped, counting_blocks, progress_bar, stored
from ui.session import app_message
from ui.store import STORE

MIB = 8 * 2**20
CALIBRATION_WINDOWS, CALIBRATION_TOKENS = 4, 128  # sensitivity and allocation of an LM: a few windows
_GROUP_HELP = GLOSSARY["scale_group"]


def _formats_text(name: str) -> str:
    return FORMATS[name].label


def _calibration(base: ModelHandle) -> data.Batch:
    """The evaluation batch, cut to a few windows for an LM (sensitivity runs one forward per
    block; the lab measures the chosen allocation on the whole batch)."""
    batch = eval_batch(base)
    if base.kind != "causal-lm" or len(batch.tokens) <= CALIBRATION_WINDOWS:
        return batch
    mask = batch.answer_mask
    return dataclasses.replace(batch, tokens=batch.tokens[:CALIBRATION_WINDOWS, :CALIBRATION_TOKENS], n_bytes=0,
                               answer_mask=None if mask is None else mask[:CALIBRATION_WINDOWS, :CALIBRATION_TOKENS],
                               source=f"{CALIBRATION_WINDOWS} windows of {CALIBRATION_TOKENS} tokens of {batch.source}")


def bits_per_weight(handle: ModelHandle, names: list[str], fmt: str, group_size: int | None) -> tuple[float, str]:
    """Storage per weight of the layers `names` in `fmt` (codes + 16-bit scales + zero points),
    from their shapes alone, and the groups that gives ("groups of 80", "one scale per row")."""
    f = FORMATS[fmt]
    layers = handle.linear_layers()
    bits = weights = 0
    sizes, kinds = set(), set()
    shared = group_for(fmt, [layers[n] for n in names], group_size)  # what the edit will take
    for name in names:
        out = layers[name].shape[0]
        row = layers[name][0].numel()
        group = group_columns(f, row, shared)
        n_scales = 1 if group < 0 else out * (row // group)
        bits += out * row * f.code_bits + n_scales * (SCALE_BITS + (f.code_bits if f.zero_point else 0))
        weights += out * row
        if group < 0:
            kinds.add("one scale per tensor")
        elif group == row:
            kinds.add("one scale per row")
        else:
            sizes.add(group)
    if sizes:
        kinds.add(f"groups of {' and '.join(map(str, sorted(sizes)))} columns")
    return bits / max(weights, 1), ", ".join(sorted(kinds))


def _explain(handle: ModelHandle, names: list[str], fmt: str, group_size: int | None) -> str:
    f = FORMATS[fmt]
    per, groups = bits_per_weight(handle, names, fmt, group_size)
    code = {"int": f"{f.code_bits}-bit integers in [{f.qmin}, {f.qmax}]",
            "int-asym": f"{f.code_bits}-bit integers 0..{f.qmax} with a zero point",
            "nf4": "the 16 NormalFloat codes (spaced like a normal distribution) times the block's absmax",
            "float": f"{f.code_bits}-bit floats ({f.label.split()[-1]}, largest {f.minifloat.max_value:g})"
            if f.minifloat else "", "binary": "±1 times the mean |w| of the row"}[f.scheme]
    return (f"**{f.label}**: {code}; {groups} (16-bit scales) → **{per:.2f} bits per weight** "
            f"on these {len(names)} layers, against 32 in float32.")


# ---------------------------------------------------------------------- quantize weights


@method("Quantize weights", LM_AND_IMAGES,
        "Round the weights of the layers in scope to a low-bit format with a scale per group of weights "
        "(simulated: the model computes in float with exactly the values the format holds). Size counts codes, "
        "scales and zero points.")
def quantize(base: ModelHandle, edited: ModelHandle) -> Edit | None:
    fmt = st.selectbox("Format", list(FORMATS), format_func=_formats_text, key="lab_quant_format",
                       help=GLOSSARY["quantization"])
    group_size = None
    if FORMATS[fmt].group > 0:
        if st.toggle(f"Own group size (default {FORMATS[fmt].group}, or the largest below it that divides every row)",
                     key="lab_quant_own_group", help=_GROUP_HELP):
            rows = [w[0].numel() for w in edited.linear_layers().values()]
            start = common_group(FORMATS[fmt], rows)  # divides every row: no error before the user types
            group_size = int(st.number_input("Columns per scale group", 1, 4096, start, step=1,
                                             key="lab_quant_group", help=_GROUP_HELP))
    scope, layers = scope_controls(base, edited, "quant")
    if scope == "layers" and not layers:
        return None
    rounding = st.radio("Rounding", ["rtn", "quantease"], horizontal=True, key="lab_quant_method",
                          format_func={"rtn": "round to nearest", "quantease": "calibrated (QuantEase)"}.get,
                          help=f"{GLOSSARY['round_to_nearest']} {GLOSSARY['quantease']}")
    activations = st.checkbox(
        "Quantize the layers' inputs too (W8A8)" if fmt in ACTIVATION_FORMATS
        else f"Quantize the layers' inputs too (only {', '.join(ACTIVATION_FORMATS)})",
        key="lab_quant_activations", disabled=fmt not in ACTIVATION_FORMATS,
        help=GLOSSARY["activation_quantization"]) and fmt in ACTIVATION_FORMATS
    edit = Quantize(fmt, scope, layers, group_size, activations, rounding)
    edit.check(edited)  # a group size that does not divide a row: the edit's own message, shown by the lab
    names = list(scoped_layers(edited, scope, layers))
    st.markdown(_explain(edited, names, fmt, group_size), help=GLOSSARY["bits_per_weight"])
    _layer_view(base, edited, names, edit)
    if fmt == "int8" and not activations:
        _kernel_view(base, edited)
    return edit


def _layer_view(base: ModelHandle, edited: ModelHandle, names: list[str], edit: Quantize) -> None:
    """One layer's weights on the format's grid; for QuantEase, its layer-output error next to RTN."""
    layer = st.selectbox("Show one layer on the grid", names, key="lab_quant_layer")
    linear = edited.linear_layers()
    group = group_for(edit.format, [linear[n] for n in names], edit.group_size)  # the group the edit takes
    hist = STORE.get_or_compute(("quant_histogram", edited.fingerprint, layer, edit.format, group),
                                lambda: layer_histogram(edited, layer, edit.format, group))
    st.plotly_chart(plots_quant.grid_histogram(hist), width="stretch", key="lab_quant_histogram")
    held = edited.storage.get(edited.weight_name(layer))
    before = f" An earlier step already stores this layer as {held.format}: it is rounded again." if held else ""
    st.caption(f"{layer} as {hist.description}: each weight in units of its group's scale ({hist.unit}); red marks "
               f"the values the format can hold there, and every weight moves to its nearest one. Relative squared "
               f"error of this layer by round to nearest: {hist.rel_mse:.2e}.{before}")
    if edit.method != "quantease" or not st.toggle("Compare QuantEase with round to nearest on this layer", True,
                                                   key="lab_quant_compare", help=GLOSSARY["layer_output_error"]):
        return
    key = ("quant_methods", edited.fingerprint, eval_batch(base).digest, layer, edit.format, edit.group_size)

    def compare(step: Progress):
        with counting_blocks(edited, step):  # the forward that records the layer's inputs
            return compare_methods(edited, model_inputs(eval_batch(base)), edit.format, [layer], edit.group_size)

    try:
        comparison = stored(key, compare, f"QuantEase on {layer}", stop=NOT_KEPT)
    except Stopped:  # its notice is drawn, with the button that goes on
        return
    except LayerScopeError as e:
        st.info(f"No QuantEase comparison for this layer: {app_message(e)}")
        return
    left, right = st.columns(2)
    left.metric("layer-output error, round to nearest", f"{comparison.rtn[0]:.4f}", help=GLOSSARY["layer_output_error"])
    right.metric("layer-output error, QuantEase", f"{comparison.quantease[0]:.4f}",
                 f"{comparison.quantease[0] / comparison.rtn[0] - 1:+.0%}" if comparison.rtn[0] else None,
                 delta_color="inverse", help=GLOSSARY["layer_output_error"])
    st.caption("||(W - Ŵ)X|| / ||WX|| on the evaluation batch's inputs of this layer, same grid for both: QuantEase "
               "moves weights to other grid values where that cancels the rounding of their neighbours.")


# ---------------------------------------------------------------------- a real int8 kernel


def _kernel_view(base: ModelHandle, edited: ModelHandle) -> None:
    """torch's dynamic int8 CPU kernel on the edited model, next to the simulated INT8."""
    key = ("int8_kernel", edited.fingerprint, eval_batch(base).digest)
    if st.button("Measure a real int8 kernel (torch, CPU)", key="lab_quant_kernel", icon=":material/speed:",
                 help="Runs the fully connected layers of the current model with torch's dynamic int8 kernel "
                      "(int8 weights per output channel, inputs quantized on the fly) and times it against float32."):
        batch = eval_batch(base)
        try:
            with progress_bar("Timing float32 and int8 forwards",
                              lambda: st.toast("Stopped: the int8 kernel was not measured.")) as update:
                kernel = int8_kernel_comparison(edited, batch, repeats=3, progress=update)
                update(1.0, "measuring the simulated INT8 beside it")
                STORE.put(key, (kernel, simulated_int8(edited, batch, kernel.layers)))
        except LayerScopeError as e:
            st.info(f"No int8 kernel for this model: {app_message(e)}")
    found = STORE.get(key)
    if found is None:
        return
    kernel, simulated = found
    rows = {"": ["float32 (current model)", "simulated INT8 (this lab)", "torch int8 kernel"],
            "forward (ms)": [f"{kernel.float_ms:.1f}", f"{kernel.float_ms:.1f} (runs in float)",
                             f"{kernel.int8_ms:.1f}"],
            "weights of these layers (MiB)": [f"{kernel.float_bytes / 2**20:.3f}",
                                              f"{simulated.bits / MIB:.3f} (computed)",
                                              f"{kernel.int8_bytes / 2**20:.3f} (held)"]}
    for name, label in (("kl_to_base", "KL to float (nats)"), ("agreement", "top-1 agreement")):
        a, b = getattr(simulated.metrics, name), getattr(kernel.metrics, name)
        if a is not None and b is not None:
            fmt = "{:.4g}" if name == "kl_to_base" else "{:.1%}"
            rows[label] = ["reference", fmt.format(a), fmt.format(b)]
    st.table(rows)
    st.caption(kernel.sentence() + " The simulation gives the kernel's quality, not its speed: it rounds the weights "
               "and computes in float. Convolutions have no such kernel and stay in float.")


# ---------------------------------------------------------------------- LLM.int8


@method("LLM.int8 outlier split", LM,
        "Int8 weights per output row and int8 inputs per token, except the input columns where some |x| on the "
        "evaluation batch reaches the threshold: those columns (inputs and weights) stay in 16-bit.")
def llm_int8(base: ModelHandle, edited: ModelHandle) -> Edit | None:
    threshold = st.slider("Outlier threshold |x| ≥", 0.0, 20.0, 6.0, step=0.5, key="lab_int8_threshold",
                          help=GLOSSARY["llm_int8"])
    scope, layers = scope_controls(base, edited, "int8")
    if scope == "layers" and not layers:
        return None
    edit = LLMInt8(threshold, scope, layers)
    if st.toggle("Show the outlier columns of each layer", key="lab_int8_show"):
        names = list(scoped_layers(edited, scope, layers))
        key = ("outliers", edited.fingerprint, eval_batch(base).digest, threshold, tuple(names))

        def outliers(step: Progress):
            with counting_blocks(edited, step):
                return find_outliers(edited, model_inputs(eval_batch(base)), names, threshold)

        try:
            report = stored(key, outliers, "Reading every layer's inputs", stop=NOT_KEPT)
        except Stopped:  # its notice is drawn; the edit itself needs none of it
            return edit
        st.plotly_chart(plots_quant.outlier_bars(report), width="stretch", key="lab_int8_outliers")
        kept = sum(len(c) for c in report.columns)
        hit = sum(1 for c in report.columns if c)
        st.caption(f"{hit} of {len(names)} layers have inputs reaching |x| ≥ {threshold:g}; {kept} input columns "
                   f"in all stay in 16-bit (hover a bar for which). Largest |x| anywhere: {max(report.peaks):.3g}.")
    return edit


# ---------------------------------------------------------------------- mixed precision


def _sensitivity(base: ModelHandle, edited: ModelHandle, fmt: str) -> Sensitivity:
    return stored(("quant_sensitivity", edited.fingerprint, eval_batch(base).digest, fmt),
                  lambda update: sensitivity(edited, _calibration(base), fmt, progress=update),
                  "Layer sensitivity", stop="Nothing of it is kept; going on measures it from the start.")


@method("Mixed precision", LM_AND_IMAGES,
        "Quantize one layer at a time to measure how much each costs, then give the most sensitive layers the wider "
        "format and the others the narrower one, as many as a size budget or a tolerated quality drop allows.")
def mixed_precision(base: ModelHandle, edited: ModelHandle) -> tuple[Edit, ...] | None:
    left, right = st.columns(2)
    low = left.selectbox("Most layers in", list(FORMATS), index=list(FORMATS).index("int4"),
                         format_func=_formats_text, key="lab_mp_low", help=GLOSSARY["quantization"])
    wider = [f for f in FORMATS if FORMATS[f].code_bits > FORMATS[low].code_bits]
    high = right.selectbox("Sensitive layers in", wider + [None], key="lab_mp_high",
                           format_func=lambda f: "kept as they are" if f is None else _formats_text(f))
    goal = st.radio("Goal", ["size", "drop"], horizontal=True, key="lab_mp_goal",
                    format_func={"size": "a size budget", "drop": "a tolerated quality drop"}.get)
    if goal == "size":
        full = base.size_bits
        percent = st.slider("Size budget (share of the base model's size)", 5, 100, 20, step=1, format="%d%%",
                            key="lab_mp_budget")
        target = {"budget_bits": int(full * percent / 100)}
        st.caption(f"{percent}% of {full / MIB:.2f} MiB = {full * percent / 100 / MIB:.2f} MiB for the whole model "
                   f"(now {edited.size_bits / MIB:.2f} MiB)"
                   + ("; the embedding and the LayerNorms stay as they are." if base.kind in LM else "."))
    else:
        drop = st.number_input(f"Tolerated {drop_label(edited)}", 0.0, 10.0, 0.01, step=0.005, format="%.4f",
                               key="lab_mp_drop")
        target = {"max_drop": float(drop)}
    if not st.toggle("Compute the sensitivity of every layer (one forward per layer)", key="lab_mp_go",
                     help=GLOSSARY["layer_sensitivity"]):
        return None
    sens = _sensitivity(base, edited, low)
    key = ("quant_allocation", edited.fingerprint, eval_batch(base).digest, low, high, tuple(target.items()))
    plan: Allocation = stored(key, lambda step: allocate(edited, _calibration(base), sens, low, high, **target,
                                                         progress=step), "Choosing bits per layer", stop=NOT_KEPT)
    st.plotly_chart(plots_quant.sensitivity_bars(sens, plan), width="stretch", key="lab_mp_bars")
    chosen = ", ".join(f"{'block ' if isinstance(u, int) else ''}{u}: {f or 'kept'}"
                       for u, f in zip(plan.units, plan.formats))
    verdict = "met" if plan.met else "**not met** (the closest allocation is shown)"
    st.caption(f"Bar height: {sens.label} when only that layer is in {low} (on {_calibration(base).source}). "
               f"Chosen: {chosen}. Goal {plan.goal}: {verdict}; size {plan.size_bits / MIB:.2f} MiB, "
               f"measured drop {plan.drop:.3g}. The lab measures the real effect once you add it.")
    return plan.edits or None


METHODS = (quantize, llm_int8, mixed_precision)  # in menu order
