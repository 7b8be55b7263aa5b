"""Redundancy rows (issue bars: one pass <= 1.3, lens <= 1.2, sweep <= 1.15 x FLOP minimum)."""

from __future__ import annotations

from analysis import layer_drop, redundancy
from bench.common import Row, timed_pair


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


def rows(handle, batch) -> list[Row]:
    L = handle.structure.n_layers
    forward = lambda: handle.forward(batch.tokens)  # noqa: E731

    def one_pass():  # the statistics need the residual stream only, not the logits
        redundancy.layer_similarity(redundancy.collect_residuals(handle, batch, with_logits=False))

    def one_pass_and_logits():
        redundancy.layer_similarity(redundancy.collect_residuals(handle, batch))

    t_pass, t_fwd = timed_pair(one_pass, forward, repeats=3)
    t_both, t_fwd2 = timed_pair(one_pass_and_logits, forward, repeats=3)
    out = [Row("similarity+angular+CKA+norms / forward", t_pass / t_fwd,
               f"{t_pass * 1000:.0f} ms vs {t_fwd * 1000:.0f} ms (bar <= 1.3); "
               f"also computing the logits: {t_both / t_fwd2:.3f}")]

    res = redundancy.collect_residuals(handle, batch)
    h = res.resid[:, :, res.skip:]

    def lens():
        redundancy.logit_lens(handle, redundancy.collect_residuals(handle, batch, with_logits=False))

    def unavoidable():
        handle.forward(batch.tokens)
        for layer in range(L):
            handle.readout(h[layer].reshape(-1, h.shape[-1]))

    t_lens, t_min = timed_pair(lens, unavoidable, repeats=3)
    out.append(Row("logit lens / (forward + L readouts)", t_lens / t_min,
                   f"{t_lens * 1000:.0f} ms vs {t_min * 1000:.0f} ms (bar <= 1.2)"))

    def reuse_sweep():
        layer_drop.lm_drop_sweep(handle, batch, redundancy.collect_residuals(handle, batch), kinds=("block",))

    def naive_sweep():
        layer_drop.naive_lm_drop_sweep(handle, batch, kinds=("block",))

    t_reuse, t_naive = timed_pair(reuse_sweep, naive_sweep, repeats=1)
    predicted = flop_sweep_ratio(handle, batch.tokens.shape[1])
    measured = t_reuse / t_naive
    out.append(Row("drop sweep prefix reuse / naive", measured,
                   f"FLOP minimum {predicted:.3f}; measured/minimum {measured / predicted:.3f} (bar <= 1.15); "
                   f"{t_reuse:.1f} s vs {t_naive:.1f} s"))
    return out

