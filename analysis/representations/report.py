"""Sentences of the Representations page, built from the numbers of the model in front of
the reader (a `ProbeResult`, a `DepthFit`), so a caption never says what the model does not
show."""

from __future__ import annotations

from analysis.representations.depth import DepthFit
from analysis.representations.image_labels import INK_THRESHOLD
from analysis.representations.probes import ProbeResult

LOW_SELECTIVITY = 0.05  # below this everywhere, the control task is about as easy as the properties


def _pct(share: float) -> str:
    return f"{100 * share:.0f}%"


def _points(share: float) -> str:
    return f"{100 * share:+.0f} points"


def labelled_sentence(result: ProbeResult) -> str:
    """How many tokens each property could be read for, and how the split was made (for
    images: which images, how they were split, how the properties are read)."""
    if result.unit == "image":
        return image_data_sentence(result)
    counts = ", ".join(f"{name} {int(n):,}" for name, n in zip(result.names, result.n_labelled))
    split = ("training and test windows come from different files" if result.split == "file"
             else "the text is one file, so windows (not files) were split")
    return (f"Tokens labelled by Python's tokenize and ast, of {result.n_positions:,} read ({result.source}): "
            f"{counts}; the rest (whitespace outside a token, blank lines, code that does not parse) are skipped; "
            f"{split}, about {_pct(result.n_test.sum().item() / max(1, result.n_labelled.sum().item()))} "
            "of the tokens are test tokens.")


def property_sentences(result: ProbeResult) -> list[str]:
    """One sentence per property: its best depth, accuracy there, and the three references."""
    out = []
    lookup = result.baseline_name
    for i, name in enumerate(result.names):
        best = int(result.accuracy[i].argmax())
        gain = result.accuracy[i] - result.token_alone[i]
        first = next(d for d in range(len(gain)) if gain[d] >= 0.9 * gain.max()) if gain.max() > 0 else best
        last = len(gain) - 1
        reach = (f"; 90% of its gain over the {lookup} is there by {result.depth_name(first)}"
                 if gain.max() > 0.02 and first > 0 else "" if gain.max() > 0.02
                 else f"; no depth reads it better than the {lookup}")
        if best != last:
            reach += f"; {_pct(float(result.accuracy[i, last]))} at {result.depth_name(last)}"
        out.append(f"{name[:1].upper() + name[1:]}: best at {result.depth_name(best)}, "
                   f"{_pct(float(result.accuracy[i, best]))} of test {result.unit}s (majority class "
                   f"{_pct(float(result.majority[i]))}, {lookup} {_pct(float(result.token_alone[i]))}, control task "
                   f"{_pct(float(result.control[i, best]))}){reach}.")
    return out


def image_data_sentence(result: ProbeResult) -> str:
    """Which images the stage probes read and how their properties and control are made."""
    classes = "; ".join(f"{name}: {' / '.join(c)}" for name, c in zip(result.names, result.classes)
                        if len(c) == 2)
    return (f"Images: {result.source}. Ink mass is the sum of the clean digit's pixel intensities (0 to 1 "
            f"each); stroke thickness the mean, over its ink pixels (intensity at least {INK_THRESHOLD}), of the "
            "shorter of the horizontal and vertical runs of ink through the pixel; both are cut at the training "
            f"images' median ({classes}). The control "
            "task gives every cell of the input space (the images nearest one prototype, by raw-pixel distance) one "
            "random class drawn from the property's class shares; the nearest-prototype baseline answers "
            "each test image with its cell's most frequent training class.")


def selectivity_sentence(result: ProbeResult) -> str:
    """Where the probe is most selective, or why selectivity says little on this model."""
    selectivity = result.selectivity
    i, d = divmod(int(selectivity.argmax()), selectivity.shape[1])
    top = float(selectivity[i, d])
    where = f"{result.names[i]} at {result.depth_name(d)}"
    text = (f"Selectivity (accuracy − control) is highest for {where}: {_points(top)}." if top > 0 else
            f"Selectivity (accuracy − control) is negative at every depth (at best {_points(top)}, {where}).")
    if top < LOW_SELECTIVITY:
        control0 = float(result.control[:, 0].mean())
        memorise = "token type" if result.unit == "token" else "cell of similar-looking inputs"
        text += (f" The control task is as easy as the properties (on average {_pct(control0)} at "
                 f"{result.depth_name(0)}): a linear probe here can memorise a class for every {memorise}, so read "
                 f"the accuracies against the {result.baseline_name} baseline instead.")
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
    if fit.qkv_layout is not None:
        how = {"blocks": "stored as [all Q | all K | all V]", "per-head": "stored head by head, [q k v] per head"}
        fitted += (f" Q, K and V are the rows of the model's one fused query/key/value weight "
                   f"({how.get(fit.qkv_layout, fit.qkv_layout)}); sharing moves the fused weight as a whole.")
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
