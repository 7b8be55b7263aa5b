"""Sentences the Channels view shows, built from the numbers of the model in front of
the user (so a caption never claims a circuit the model does not have)."""

from __future__ import annotations

import torch

from analysis.channels.circuits import ChannelComponents, Circuits, Composition, head_label
from analysis.channels.heads import REGIMES, ROLE_THRESHOLDS, HeadRoles, Intervention, role_mask
from analysis.metric_text import metric_change, metric_value
from lib.metrics import LABELS

ROLE_NAMES = {"previous_token": "previous-token", "duplicate_token": "duplicate-token", "induction": "induction",
              "sink": "attention-sink"}
STRONG = 2.0  # a channel "stands out" at twice the random baseline


def approximation_note(c: Circuits) -> str | None:
    """What the weight-only scores leave out for this model, or None when they are exact."""
    notes = []
    if c.rotary:
        notes.append("This model uses rotary position embeddings: queries and keys are rotated by their "
                     "positions between W_Q and W_K, so the weight-only QK circuit, its spectrum and the Q- and "
                     "K-composition scores leave that rotation out and are only approximate (V-composition is "
                     "exact). The interventions below measure the real model.")
    if c.grouped:
        notes.append(f"It uses grouped-query attention: {c.n_heads} query heads share {c.n_kv_heads} key/value "
                     f"heads, so heads of one group have the same W_K and W_V (their OV circuits differ only "
                     f"by W_O).")
    return " ".join(notes) or None


def role_rule() -> str:
    """When a head counts as having a role, from the one threshold table:
    "previous-token ≥ 0.5, duplicate-token ≥ 0.3, induction ≥ 0.3"."""
    return ", ".join(f"{ROLE_NAMES[role]} ≥ {threshold:g}" for role, threshold in ROLE_THRESHOLDS.items())


def _heads_with(roles: HeadRoles, role: str) -> list[tuple[tuple[int, int], float]]:
    scores = getattr(roles, role)
    found = [((l, h), float(scores[l, h])) for l, h in role_mask(roles, role).nonzero().tolist()]
    return sorted(found, key=lambda x: -x[1])


def roles_sentence(roles: HeadRoles) -> str:
    """Which heads have which role, with their scores; the best score when none does."""
    parts = []
    for role, threshold in ROLE_THRESHOLDS.items():
        found = _heads_with(roles, role)
        name = ROLE_NAMES[role]
        if found:
            listed = ", ".join(f"{head_label(h)} ({s:.2f})" for h, s in found[:4])
            parts.append(f"{name} head{'s' if len(found) > 1 else ''}: {listed}"
                         + (f" and {len(found) - 4} more" if len(found) > 4 else ""))
        else:
            head, score = roles.best(role)
            parts.append(f"no clear {name} head (best {head_label(head)}, {score:.2f} < {threshold})")
    sink_head, sink = roles.best("sink")
    counts = torch.bincount(roles.regime.flatten(), minlength=len(REGIMES)).tolist()
    regimes = ", ".join(f"{n} {name}" for n, name in zip(counts, REGIMES) if n)
    text = "; ".join(parts)
    return (text[:1].upper() + text[1:] + f". Most attention on position 0: {head_label(sink_head)} "
            f"({sink:.2f} of its attention). Regimes: {regimes}.")


def composition_sentence(comp: Composition, mode: str) -> str:
    """The strongest pair of `mode` and how many stand out."""
    top = comp.strongest(mode, 1)
    if not top:
        return "This model has a single layer: no head can read another head's output."
    rel = comp.relative(mode)[comp.valid]
    strong = int((rel >= STRONG).sum())
    return (f"Strongest {mode}-composition: {top[0].writer_label} → {top[0].reader_label}, "
            f"{top[0].relative:.2f}× the random baseline 1/√d = {comp.baseline:.3f}; {strong} of {rel.numel()} "
            f"writer/reader pairs reach {STRONG:g}×." + (" Q and K scores are approximate for this rotary model."
                                                          if comp.rotary and mode != "V" else ""))


def circuit_sentence(roles: HeadRoles, comp: Composition, n: int = 3) -> str:
    """Whether a previous-token head K-composes into an induction head among the `n`
    strongest K channels (the induction circuit), said with the numbers either way."""
    prev = dict(_heads_with(roles, "previous_token"))
    ind = dict(_heads_with(roles, "induction"))
    for rank, ch in enumerate(comp.strongest("K", n)):
        if ch.writer in prev and ch.reader in ind:
            where = "the strongest K-composition" if rank == 0 else f"K-composition number {rank + 1}"
            return (f"Induction circuit: {where}, {ch.writer_label} → {ch.reader_label} "
                    f"({ch.relative:.2f}× baseline), joins a previous-token head ({prev[ch.writer]:.2f}) to an "
                    f"induction head ({ind[ch.reader]:.2f}): the writer puts 'which token came before me' into "
                    f"the residual stream, the reader's keys use it to find the token after an earlier copy of "
                    f"the current one. Cut the writer below to test it.")
    if prev and ind:
        return (f"This model has previous-token heads ({', '.join(map(head_label, prev))}) and induction heads "
                f"({', '.join(map(head_label, ind))}), but none of its {n} strongest K-compositions joins one to "
                f"the other: the weights alone do not show an induction circuit.")
    missing = " or ".join(ROLE_NAMES[r] for r, found in (("previous_token", prev), ("induction", ind)) if not found)
    return f"No induction circuit: on the repeated-token probe this model shows no clear {missing} heads."


def components_sentence(parts: ChannelComponents, mass: float = 0.8) -> str:
    """How many of the writer's directions carry `mass` of the pair's composition."""
    order = parts.shares.argsort(descending=True)
    carried = parts.shares[order].cumsum(0)
    k = min(int((carried < mass).sum()) + 1, len(order))
    best = int(order[0])
    return (f"The strongest {k} of {parts.shares.numel()} directions of {parts.channel.writer_label}'s output "
            f"together carry {float(carried[k - 1]):.1%} (at least {mass:.0%}) of its {parts.channel.mode}-composition "
            f"with {parts.channel.reader_label}; component {best} alone carries {float(parts.shares[best]):.1%} "
            f"({float(parts.relative[best]):.2f}× baseline).")


def intervention_sentence(result: Intervention) -> str:
    """The edit's effect on the evaluation set (where `result`'s metrics were measured; the
    prompt only gives the reader's pattern), accuracy in percent as on the Model page."""
    metric, label = result.metric, LABELS[result.metric]
    before, after = getattr(result.before, metric), getattr(result.after, metric)
    worse = (after < before) if result.higher_is_better else (after > before)
    what = result.edit.label
    return (f"{what[:1].upper() + what[1:]}, on the evaluation set: {label} {metric_value(metric, before)} → "
            f"{metric_value(metric, after)} ({metric_change(metric, after - before)}, "
            f"{'worse' if worse and abs(after - before) > 1e-9 else 'no worse'}); "
            f"KL to the unedited model {result.after.kl_to_base:.3g} nats, top-1 agreement "
            f"{result.after.agreement:.1%}.")
