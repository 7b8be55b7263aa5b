"""Sentences of the Representations page, built from the numbers of the model in front of
the reader (a `ProbeResult`, a `DepthFit`), so a caption never says what the model does not
show."""

from __future__ import annotations

from analysis.representations.dataset import PROPERTY_NAMES
from analysis.representations.depth import DepthFit
from analysis.representations.probes import ProbeResult

LOW_SELECTIVITY = 0.05  # below this everywhere, the control task is about as easy as the properties


def _pct(share: float) -> str:
    return f"{100 * share:.0f}%"


def _points(share: float) -> str:
    return f"{100 * share:+.0f} points"


def labelled_sentence(result: ProbeResult) -> str:
    """How many tokens each property could be read for, and how the split was made."""
    counts = ", ".join(f"{PROPERTY_NAMES[p]} {int(n):,}" for p, n in zip(result.properties, result.n_labelled))
    split = ("training and test windows come from different files" if result.split == "file"
             else "the text is one file, so windows (not files) were split")
    return (f"Tokens labelled by Python's tokenize and ast, of {result.n_positions:,} read ({result.source}): "
            f"{counts}; the rest (whitespace outside a token, blank lines, code that does not parse) are skipped; "
            f"{split}, about {_pct(result.n_test.sum().item() / max(1, result.n_labelled.sum().item()))} "
            "of the tokens are test tokens.")


def property_sentences(result: ProbeResult) -> list[str]:
    """One sentence per property: its best depth, accuracy there, and the three references."""
    out = []
    for i, prop in enumerate(result.properties):
        best = int(result.accuracy[i].argmax())
        gain = result.accuracy[i] - result.token_alone[i]
        first = next(d for d in range(len(gain)) if gain[d] >= 0.9 * gain.max()) if gain.max() > 0 else best
        reach = (f"; 90% of its gain over the token alone is there by depth {first}" if gain.max() > 0.02
                 else "; no depth reads it better than the token alone")
        name = PROPERTY_NAMES[prop]
        out.append(f"{name[:1].upper() + name[1:]}: best at depth {best}, "
                   f"{_pct(float(result.accuracy[i, best]))} of test tokens (majority class "
                   f"{_pct(float(result.majority[i]))}, token alone {_pct(float(result.token_alone[i]))}, control task "
                   f"{_pct(float(result.control[i, best]))}){reach}.")
    return out


def selectivity_sentence(result: ProbeResult) -> str:
    """Where the probe is most selective, or why selectivity says little on this model."""
    selectivity = result.selectivity
    i, d = divmod(int(selectivity.argmax()), selectivity.shape[1])
    top = float(selectivity[i, d])
    where = f"{PROPERTY_NAMES[result.properties[i]]} at depth {d}"
    text = (f"Selectivity (accuracy − control) is highest for {where}: {_points(top)}." if top > 0 else
            f"Selectivity (accuracy − control) is negative at every depth (at best {_points(top)}, {where}).")
    if top < LOW_SELECTIVITY:
        control0 = float(result.control[:, 0].mean())
        text += (f" The control task is as easy as the properties (on average {_pct(control0)} at depth 0): a linear "
                 "probe here can memorise a class for every token type, so read the accuracies against the "
                 "token-alone baseline instead.")
    return text


def depth_sentences(fit: DepthFit) -> list[str]:
    """The depth-linearity verdict, the consecutive cosines and what sharing would lose."""
    mean_residual = fit.residual.mean(1)  # [F]
    chance = float(fit.chance.mean())
    best = int(mean_residual.argmin())
    verdict = (f"{fit.labels[best]} is the most linear in depth: {_pct(float(mean_residual[best]))} left on average, "
               f"against {_pct(chance)} for layers that share nothing"
               if float(mean_residual[best]) < 0.9 * chance else
               f"no family is closer to a straight line in depth than unrelated layers would be ({_pct(chance)} "
               f"left on average; the closest is {fit.labels[best]} at {_pct(float(mean_residual[best]))})")
    fitted = (f"Fitting each family's {len(fit.layers)} layers as θ_A + (l/L)·θ_B (L = {fit.n_layers}): {verdict}.")
    f, p = divmod(int(fit.cosine.argmax()), fit.cosine.shape[1])
    pair = fit.pairs[p]
    cosines = (f"Consecutive layers' weights have cosines from {float(fit.cosine.min()):.3f} to "
               f"{float(fit.cosine.max()):.3f} (the most alike: {fit.labels[f]} of blocks {pair[0]} and {pair[1]}); "
               "0 means unrelated, 1 equal up to scale.")
    k = int(fit.share_total.argmin())
    cheapest = fit.pairs[k]
    rank = "pure sharing" if fit.share_rank == 0 else f"sharing with rank-{fit.share_rank} deltas"
    share = (f"With {rank}, block {cheapest[1]} taking block {cheapest[0]}'s weights loses least: its linear weights "
             f"change by {_pct(float(fit.share_total[k]))} of their norm (all pairs: "
             f"{_pct(float(fit.share_total.min()))} to {_pct(float(fit.share_total.max()))}; unrelated layers of "
             f"equal norm give about 141% with pure sharing), saving {int(fit.share_params[k]):,} weights.")
    return [fitted, cosines, share]
