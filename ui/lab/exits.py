"""The lab's early-exit method (`analysis.compress.exits`, issue 14): criterion, threshold
and lens, with the trade-off curve of every criterion and the prompt's tokens coloured by
exit layer.

Every number and curve here comes from one recorded pass over the evaluation batch
(`collect_exit_stats`), kept in `STORE` by the edited model's fingerprint and the lens:
moving the threshold only reads it again. A tuned lens or exit heads are trained once per
model fingerprint, on request (the tuned lens) or at once (exit heads take seconds).
"""

from __future__ import annotations

from functools import partial

import streamlit as st

from analysis.compress import exits as ex
from analysis.compress.edits import Edit
from analysis.compress.exits import plots as plots_exits
from lib.data import MAX_PROMPT_CHARS
from lib.errors import LayerScopeError, RecipeError
from lib.handle import ModelHandle
from lib.progress import Progress
from ui.cache import eval_batch
from ui.glossary import GLOSSARY
from ui.lab.methods import method
from ui.progress import progress_bar, stored
from ui.remember import keep, recall
from ui.session import app_message
from ui.store import STORE

EXIT_KINDS = ("causal-lm", "image-classifier")
DEFAULT_PROMPT = "def __init__(self, name, value=None): self.name = name"
N_IMAGES = 8

CRITERION_HELP = {
    "max_prob": "Exit once the most likely token (or class) has probability at least t: confident predictions "
                "leave early. A higher t keeps more tokens to the end.",
    "entropy": "Exit once the predicted distribution's entropy is at most t nats: peaked predictions leave early. "
               "A lower t keeps more tokens to the end.",
    "patience": "Exit once the top prediction has stayed the same for t checked layers in a row. A higher t waits "
                "longer; t = 0 exits at the first check.",
    "saturation": "Exit once the hidden state stops turning: the cosine between a layer's state and the previous "
                  "one is at least t. Deciding needs no readout, only the exit reads one out.",
}
CRITERION_TERMS = {"max_prob": "max_probability", "entropy": "entropy", "patience": "patience",
                   "saturation": "state_saturation"}
LENS_HELP = {"logit": GLOSSARY["logit_lens"], "tuned": GLOSSARY["tuned_lens"], "heads": GLOSSARY["exit_heads"]}


EXIT_MEMORY = "lab_exit_memory"  # the exit controls' values, cleared for another model (`_default_exit`)
_recall = partial(recall, memory=EXIT_MEMORY)
_keep = partial(keep, memory=EXIT_MEMORY)


def _stored_lens(edited: ModelHandle, lens: str) -> ex.ExitLens | None:
    """The trained lens `lens` for this model if one is at hand (the recipe's own exit step,
    STORE, or the analysis' cache), made known to `exit_lens` again, so nothing retrains it;
    None if untrained. A model with an exit rule has a fingerprint of its own, but its
    layers are those the rule's lens was trained on (or, after later edits, the ones it
    exits through)."""
    if lens == "logit":
        return ex.exit_lens(edited, lens)
    key = ("exit_lens", edited.fingerprint, lens)
    found = STORE.get(key)
    rule = edited.exit_rule
    if found is None and isinstance(rule, ex.ExitRule) and rule.lens.kind == lens:
        found = rule.lens
        STORE.put(key, found)
    if found is None and ex.has_trained(edited, lens):
        found = ex.exit_lens(edited, lens)
        STORE.put(key, found)
    if found is not None and not ex.has_trained(edited, lens):
        ex.remember_lens(edited, found)
    return found


def _train_lens(edited: ModelHandle, lens: str, stoppable: bool = True) -> ex.ExitLens:
    """Train `lens` under a progress bar; a stoppable training (one the visitor asked for)
    has a Stop button, and a stop trains nothing."""
    label = f"Training the {ex.LENS_LABELS[lens]}"
    on_stop = (lambda: st.toast(f"Stopped: {label}. Nothing was trained.")) if stoppable else None
    with progress_bar(label, on_stop) as update:
        trained = ex.exit_lens(edited, lens, progress=update)
    STORE.put(("exit_lens", edited.fingerprint, lens), trained)
    return trained


def _lens_ready(edited: ModelHandle, lens: str) -> bool:
    """Whether `lens` can read out now; offers to train a tuned lens, trains exit heads."""
    if _stored_lens(edited, lens) is not None:
        return True
    if lens == "heads":  # seconds, and the only lens a classifier has: trained unasked, so not stopped
        _train_lens(edited, lens, stoppable=False)
        return True
    offer = st.empty()
    with offer.container():
        st.info("The tuned lens is trained once for this model (the current edited one): a least-squares fit and "
                "a few gradient steps on the evaluation set's training part (seconds for a small model, a minute or "
                "more for a large one).")
        clicked = st.button("Train the tuned lens", key="lab_exit_train", icon=":material/model_training:")
    if clicked:
        offer.empty()
        _train_lens(edited, lens)
    return clicked


def exit_pass_key(base: ModelHandle, edited: ModelHandle, lens: str) -> tuple:
    """Where the recorded pass of `edited` through `lens` on `base`'s evaluation batch is kept."""
    return "exit_pass", edited.fingerprint, eval_batch(base).digest, lens


def _pass(base: ModelHandle, edited: ModelHandle, lens: str
          ) -> tuple[ex.ExitStats, dict[str, ex.ExitCurve], ex.ExitPoint | None]:
    """The one recorded pass, every criterion's curve and the best exit through `lens`
    (`best_exit`; computed once per model and lens)."""
    def compute(update: Progress) -> tuple:
        stats = ex.collect_exit_stats(edited, eval_batch(base), lens, progress=update)
        return stats, ex.exit_curves(stats), ex.best_exit(base, stats)

    return stored(exit_pass_key(base, edited, lens), compute, "Recording every layer's readout",
                  stop="Nothing of it is kept; going on records it from the start.")


def _choose(criterion: str, threshold: float, lens: str) -> None:
    """Make these the exit controls' values (before the widgets are drawn, or from a
    button's callback)."""
    for key, value in (("lab_exit_criterion", criterion), ("lab_exit_lens", lens),
                       (f"lab_exit_threshold_{criterion}", int(threshold) if criterion == "patience" else threshold)):
        st.session_state[key] = _keep(key, value)


def _default_exit(base: ModelHandle, edited: ModelHandle) -> None:
    """On the first visit with this base model, start from the measured curves rather than
    a fixed rule: the criterion, lens and threshold that save the most compute at <= 1 %
    agreement loss, over the lenses ready now (a tuned lens only once trained). Later visits
    keep what the user chose."""
    memory = st.session_state.setdefault(EXIT_MEMORY, {})
    if memory.get("model") == base.fingerprint:
        return
    memory.clear()  # another model: another model's thresholds mean nothing here
    for key in [k for k in st.session_state if str(k).startswith("lab_exit_")]:
        if key != EXIT_MEMORY:
            del st.session_state[key]
    ready = [lens for lens in ex.lens_choices(base) if lens != "tuned" or _stored_lens(edited, lens) is not None]
    best = [(point, lens) for lens in ready if _lens_ready(edited, lens)
            for point in [_pass(base, edited, lens)[2]] if point is not None]
    if best:
        point, lens = max(best, key=lambda found: found[0].saved)
        _choose(point.criterion, point.threshold, lens)
    memory["model"] = base.fingerprint  # only now: a pass stopped above (`Stopped`) is chosen from later


def _best_note(point: ex.ExitPoint | None, chosen: ex.ExitPoint, lens: str) -> None:
    """What the curves say is the best exit through this lens, with a button to take it;
    or that none saves compute here."""
    keep = f"{1 - ex.MAX_AGREEMENT_LOSS:.0%}"
    if point is None:
        st.info(f"No threshold of any criterion saves compute through the {ex.LENS_LABELS[lens]} while {keep} of the "
                "predictions stay what the full model says: on this model the exit checks cost more than the "
                "layers they skip, or the early layers do not yet know the answer."
                + (" Try the tuned lens." if lens == "logit" else ""))
        return
    best = (f"Best through the {ex.LENS_LABELS[lens]}: {ex.CRITERION_LABELS[point.criterion]} with t = "
            f"{point.threshold:g} saves {point.saved:.1%} of the compute at {point.agreement:.1%} agreement (the "
            f"largest saving with at least {keep} agreement).")
    same = (point.criterion, point.threshold) == (chosen.criterion, chosen.threshold)
    left, right = st.columns([4, 1], vertical_alignment="center")
    left.caption(best)
    right.button("Use it", key="lab_exit_best", disabled=same, width="stretch",
                 on_click=_choose, args=(point.criterion, point.threshold, lens))


def _threshold(base: ModelHandle, criterion: str) -> float:
    span = ex.threshold_range(base, criterion)
    label = {"max_prob": "Threshold t (max probability)", "entropy": "Threshold t (entropy, nats)",
             "patience": "Threshold t (checks with the same top prediction)",
             "saturation": "Threshold t (cosine between consecutive states)"}[criterion]
    key = f"lab_exit_threshold_{criterion}"
    kept = _recall(key, lambda value: span.low <= value <= span.high)
    if span.integer:
        value = st.slider(label, int(span.low), int(span.high), None if kept else int(span.default), step=1, key=key)
    else:
        digits = 3 if span.step < 0.01 else 2
        value = st.slider(label, span.low, span.high, None if kept else span.default, step=span.step,
                          format=f"%.{digits}f", key=key)
    return _keep(key, value)


def _numbers(base: ModelHandle, point: ex.ExitPoint) -> None:
    """The current threshold's numbers, three to a row (a narrow column cuts longer rows)."""
    lm = base.kind == "causal-lm"
    items = [(f"mean exit layer (of {point.n_layers})", f"{point.mean_exit:.2f}", GLOSSARY["exit_layer"]),
             ("exit early", f"{point.early:.0%}", "Share of predictions that stop before the last layer."),
             ("agreement", f"{point.agreement:.1%}",
              "Top-1 agreement of the exited predictions with the same model running every layer.")]
    items.append(("compute saved", f"{point.saved:.1%}", GLOSSARY["compute_saved"]))
    if lm:
        items.append(("saved (oracle)", f"{point.saved_oracle:.1%}", GLOSSARY["oracle_savings"]))
    if point.accuracy is not None:
        items.append(("accuracy", f"{point.accuracy:.1%}", "Share of correct exited predictions."))
    if lm:
        items.append(("perplexity", f"{point.perplexity:.3g}",
                      f"Of the exited predictions. {GLOSSARY['perplexity']}"))
    for row in range(0, len(items), 3):
        for column, (label, value, helptext) in zip(st.columns(3), items[row:row + 3]):
            column.metric(label, value, help=helptext)


def _tradeoff(base: ModelHandle, curves: dict[str, ex.ExitCurve], point: ex.ExitPoint) -> None:
    qualities = ["agreement"] + (["accuracy"] if point.accuracy is not None else []) + \
        (["perplexity"] if base.kind == "causal-lm" else [])
    left, right = st.columns([3, 2], vertical_alignment="bottom")
    _recall("lab_exit_quality", lambda value: value in qualities)
    quality = _keep("lab_exit_quality", left.radio("Plot compute saved against", qualities, horizontal=True,
                                                   key="lab_exit_quality"))
    oracle = False
    if base.kind == "causal-lm":
        _recall("lab_exit_oracle")
        oracle = _keep("lab_exit_oracle", right.toggle("Oracle savings", key="lab_exit_oracle",
                                                       help=GLOSSARY["oracle_savings"]))
    figure = plots_exits.tradeoff_curves(curves, quality, oracle, current=point, keys_values=base.kind == "causal-lm")
    st.plotly_chart(figure, width="stretch", key="lab_exit_tradeoff")
    st.caption("Each line is one criterion over its whole threshold range, from one recorded pass; the star is the "
               "threshold above. Left of the dashed line the exit checks cost more than the skipped layers save.")


def _examples(base: ModelHandle, edited: ModelHandle, criterion: str, threshold: float, lens: str) -> None:
    """LMs: the user's prompt, each token coloured by its exit layer; classifiers: a few
    evaluation images with their exit stage."""
    if base.kind == "causal-lm":
        kept = _recall("lab_exit_prompt")
        prompt = _keep("lab_exit_prompt", st.text_input("Your prompt (press Enter to apply)",
                                                        "" if kept else DEFAULT_PROMPT, key="lab_exit_prompt",
                                                        max_chars=MAX_PROMPT_CHARS))
        try:
            shown = ex.prompt_exits(edited, prompt, criterion, threshold, lens)
        except LayerScopeError as e:
            st.warning(app_message(e))
            return
        st.plotly_chart(plots_exits.token_exits(shown), width="stretch", key="lab_exit_tokens")
        early = sum(d < shown.n_layers for d in shown.exit_depth)
        st.caption(f"Each cell is a token, coloured by the layer where the prediction of the next token exits "
                   f"({shown.n_layers}: it ran every layer). {early} of {len(shown.labels)} exit early; "
                   f"{sum(shown.agrees)} predict the same token as the full model. Hover a cell for its prediction.")
        return
    batch = eval_batch(base)
    images = batch.images[:N_IMAGES]
    shown = ex.image_exits(edited, images, criterion, threshold, lens)
    st.plotly_chart(plots_exits.image_exits(images, shown, batch.labels[:N_IMAGES].tolist()), width="stretch",
                    key="lab_exit_images")
    st.caption(f"The first {N_IMAGES} evaluation images, each with the stage where it exits and the class predicted "
               "there (✓: the same as the full model).")


@method("Early exit", EXIT_KINDS,
        "Let each token (or image) stop at the first layer where a test says its prediction is settled, and "
        "read the prediction out there. The curves and numbers below come from one recorded pass over the "
        "evaluation set; adding the edit makes the lab's model exit that way.",
        available=lambda handle: bool(ex.exit_depths(handle)))
def early_exit(base: ModelHandle, edited: ModelHandle) -> Edit | None:
    _default_exit(base, edited)
    terms = "\n".join(f"- **{ex.CRITERION_LABELS[c]}**: {GLOSSARY[CRITERION_TERMS[c]]}" for c in ex.CRITERIA)
    _recall("lab_exit_criterion", lambda value: value in ex.CRITERIA)
    criterion = _keep("lab_exit_criterion", st.radio(
        "Exit when", ex.CRITERIA, format_func=ex.CRITERION_LABELS.get, horizontal=True, key="lab_exit_criterion",
        help=f"{GLOSSARY['early_exit']}\n\n{terms}"))
    st.caption(CRITERION_HELP[criterion])
    threshold = _threshold(base, criterion)
    choices = ex.lens_choices(base)
    if len(choices) > 1:
        lenses = "\n".join(f"- **{ex.LENS_LABELS[c]}**: {LENS_HELP[c]}" for c in choices)
        _recall("lab_exit_lens", lambda value: value in choices)
        lens = _keep("lab_exit_lens", st.radio("Read predictions out through", choices, format_func=ex.LENS_LABELS.get,
                                               horizontal=True, key="lab_exit_lens", help=lenses))
    else:
        lens = choices[0]
        st.caption(f"Predictions are read out through {ex.LENS_LABELS[lens]}. {LENS_HELP[lens]}")
    try:
        edit = ex.EarlyExit(criterion, threshold, lens)
        edit.check_exits(base)
    except RecipeError as e:
        st.error(f"{app_message(e)} The recipe is unchanged.")
        return None
    if not _lens_ready(edited, lens):
        return None
    stats, curves, best = _pass(base, edited, lens)
    point = ex.exit_at(stats, criterion, threshold)
    _best_note(best, point, lens)
    _numbers(base, point)
    _tradeoff(base, curves, point)
    if lens == "tuned":
        _lens_comparison(base, edited)
    _examples(base, edited, criterion, threshold, lens)
    _recipe_note(edited, edit)
    return edit


def _lens_comparison(base: ModelHandle, edited: ModelHandle) -> None:
    """KL to the final layer per depth through the logit lens and the tuned lens, on request
    (one pass each, kept per model): how much closer the translators read."""
    if not st.toggle("Compare the tuned lens with the logit lens", key="lab_exit_compare",
                     help="KL to the model's own output at every depth, through each lens (one pass each)."):
        return

    def compute() -> list:
        batch = eval_batch(base)
        return [ex.lens_kl(edited, batch, lens) for lens in ("logit", "tuned")]

    lenses = STORE.get_or_compute(("exit_lens_kl", edited.fingerprint, eval_batch(base).digest), compute)
    st.plotly_chart(plots_exits.lens_kl_lines(lenses), width="stretch")
    logit, tuned = (lens.kl[:-1] for lens in lenses)  # the last depth is the output itself: KL 0
    st.caption(f"The tuned lens reads closer to the final layer at {int((tuned < logit).sum())} of {len(tuned)} "
               f"depths before the last (mean KL {float(tuned.mean()):.3g} vs {float(logit.mean()):.3g} nats): an "
               "exit there agrees more often with what the whole model would say.")


def _recipe_note(edited: ModelHandle, edit: ex.EarlyExit) -> None:
    """A recipe holds one early exit: say so when it has one already."""
    rule = edited.exit_rule
    if not isinstance(rule, ex.ExitRule):
        return
    if (rule.criterion, rule.threshold, rule.lens.kind) == (edit.criterion, edit.threshold, edit.lens):
        st.info("This is the recipe's early exit. Move the threshold or change the criterion to try another, and "
                "put it in place with “Replace the last edit” (or remove the exit step first if it is not last).")
    else:
        st.info("The recipe already exits early, and holds one early exit: put this one in its place with "
                "“Replace the last edit” if the exit is the last step, or remove that step first.")


METHODS = (early_exit,)
