"""Redundancy rows. Targets (issue 16, tighter than the Redundancy issue's 1.3 / 1.2 / 1.15): one
pass <= 1.1 of a forward, lens <= 1.1 of forward + L (readout + log_softmax) (and <= 1.2 of
forward + L readouts), sweep <= 1.1 x its FLOP minimum."""

from __future__ import annotations

from typing import Callable

import torch

from analysis import lens as lenses
from analysis.redundancy import cka
from analysis.redundancy import drops as layer_drop
from analysis.redundancy import similarity as redundancy
from bench.common import Row, Setup, measure, ratio_text, tokens_text


def flop_sweep_ratio(handle, seq_len: int) -> float:
    """Prefix-reuse block sweep / naive (L+1 full passes), counted in FLOPs per token:
    a block costs 24 d^2 + 4 T d (projections, MLP, attention over T keys), a readout 2 d V."""
    s = handle.structure
    block = 24 * s.d_model**2 + 4 * seq_len * s.d_model
    readout = 2 * s.d_model * s.d_vocab
    forward = s.n_layers * block + readout
    naive = (s.n_layers + 1) * forward
    reuse = forward + sum(s.n_layers - 1 - l for l in range(s.n_layers)) * block + s.n_layers * readout
    return reuse / naive


def depth_tokens(setup: Setup) -> list[torch.Tensor]:
    """The residual stream at every depth as the one-pass statistics see it: L+1 x [N, d]
    (the first `skip` positions of each window left out)."""
    res = redundancy.collect_residuals(setup.handle, setup.batch, with_logits=False)
    h = res.resid[:, :, res.skip:]
    return [layer.reshape(-1, h.shape[-1]) for layer in h]


def one_pass_row(setup: Setup) -> Row:
    handle, batch = setup.handle, setup.batch
    forward = lambda: handle.forward(batch.tokens)  # noqa: E731

    def one_pass():  # the statistics need the residual stream only, not the logits
        redundancy.layer_similarity(redundancy.collect_residuals(handle, batch, with_logits=False))

    def one_pass_and_logits():
        redundancy.layer_similarity(redundancy.collect_residuals(handle, batch))

    t = measure(one_pass, forward, setup.repeats)
    both = measure(one_pass_and_logits, forward, setup.repeats)
    return Row.timed("similarity+angular+CKA+norms / forward", t,
                     f"on {tokens_text(batch)} (target <= 1.1); also computing the logits: {ratio_text(both.ratios)}")


def cka_row(setup: Setup) -> Row:
    reps = depth_tokens(setup)
    n, widths = reps[0].shape[0], [r.shape[1] for r in reps]
    flops = cka.form_flops(n, widths)
    t = measure(lambda: cka.cka_matrix(reps, form="gram"), lambda: cka.cka_matrix(reps, form="feature"),
                setup.repeats)
    return Row.timed("cka gram / d×d form", t,
                     f"N {n} tokens, D {len(reps)} depths, d {widths[0]}; "
                     f"flop ratio {flops['gram'] / flops['feature']:.3f}; chooser picks {cka.cheaper_form(n, widths)}")


def lens_row(setup: Setup) -> Row:
    """The lens against two references: the honest minimum of METHODS §1 (the forward
    plus, per depth, one readout and one log-softmax over [tokens, vocab]) and the
    readouts alone (the earlier bar)."""
    handle, batch = setup.handle, setup.batch
    h = depth_tokens(setup)

    def lens():
        lenses.logit_lens(handle, redundancy.collect_residuals(handle, batch, with_logits=False))

    def readouts():
        handle.forward(batch.tokens)
        for layer in h[:-1]:
            handle.blocks.readout(layer)

    def honest_minimum():
        handle.forward(batch.tokens)
        for layer in h[:-1]:
            torch.log_softmax(handle.blocks.readout(layer), -1)

    t = measure(lens, honest_minimum, setup.repeats)
    plain = measure(lens, readouts, setup.repeats)
    s = handle.structure
    return Row.timed("lens / (forward + L (readout+log_softmax))", t,
                     f"N {h[0].shape[0]} tokens x vocab {s.d_vocab}, {s.n_layers} layers (target <= 1.1); "
                     f"/ (forward + L readouts): {ratio_text(plain.ratios)} ({plain.ms()}; bar <= 1.2)")


def sweep_row(setup: Setup) -> Row:
    handle, batch = setup.handle, setup.batch

    def reuse_sweep():
        layer_drop.lm_drop_sweep(handle, batch, redundancy.collect_residuals(handle, batch), kinds=("block",))

    def naive_sweep():
        layer_drop.naive_lm_drop_sweep(handle, batch, kinds=("block",))

    t = measure(reuse_sweep, naive_sweep, setup.repeats)
    predicted = flop_sweep_ratio(handle, batch.tokens.shape[1])
    return Row.timed("drop sweep prefix reuse / naive", t,
                     f"{handle.structure.n_layers} layers, {tokens_text(batch)}; FLOP minimum {predicted:.3f}; "
                     f"measured/minimum {ratio_text([r / predicted for r in t.ratios])} (target <= 1.1)")


ROWS: tuple[Callable[[Setup], Row], ...] = (one_pass_row, cka_row, lens_row, sweep_row)
