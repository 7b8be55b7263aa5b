"""The lens KL per depth is computed in two places: the Redundancy view's chunked logit lens
(`analysis.lens.logit_lens`, fast for large vocabularies) and the exits' blocked readout
through any lens (`analysis.compress.exits.stats.lens_kl`). Through the logit lens, over the
same tokens, both must give the same numbers."""

import pytest
import torch

from analysis import lens
from analysis.compress.exits import lens_kl
from analysis.redundancy.similarity import collect_residuals
from lib import data


@pytest.mark.parametrize("with_logits", [True, False], ids=["cached-logits", "readout-of-h_L"])
def test_logit_lens_kl_agrees_with_the_exits_lens_kl(tiny_lm, with_logits):
    batch = data.code_batch(tiny_lm.tokenizer, seq_len=24, n_windows=3)
    # skip=1: the redundancy lens leaves out BOS, as the exits' lens_kl does
    redundancy = lens.logit_lens(tiny_lm, collect_residuals(tiny_lm, batch, skip=1, with_logits=with_logits))
    exits = lens_kl(tiny_lm, batch, "logit")
    L = tiny_lm.structure.n_layers
    assert exits.depths == tuple(range(L + 1)) and redundancy.kl.shape == (L + 1,)
    assert torch.allclose(redundancy.kl, exits.kl.float(), rtol=1e-4, atol=1e-6)
    assert float(redundancy.kl[-1]) == float(exits.kl[-1]) == 0.0  # the output against itself
    assert (redundancy.kl[:-1] > 0).all()  # a real comparison, not two zeros
