import pytest
import torch

from analysis.predict import next_tokens, predict_image
from lib.data import DataError


def test_next_tokens_are_sorted_probabilities(tiny_lm):
    result = next_tokens(tiny_lm, "def f(x):", k=10)
    assert len(result.tokens) == 10
    assert torch.all(result.probs[:-1] >= result.probs[1:])
    logits = tiny_lm.forward(torch.tensor([[256] + list(b"def f(x):")]))[0, -1]
    assert result.token_ids[0] == int(logits.argmax())
    assert result.truncated == 0 and result.n_prompt_tokens == 10


def test_long_prompt_is_truncated_with_a_count(tiny_lm):
    result = next_tokens(tiny_lm, "a" * 100)
    assert result.n_prompt_tokens == tiny_lm.structure.n_ctx
    assert result.truncated == 100 - (tiny_lm.structure.n_ctx - 1)


def test_empty_prompt_is_refused(tiny_lm):
    with pytest.raises(DataError, match="empty"):
        next_tokens(tiny_lm, "  \n")


def test_predict_image_probabilities_sum_to_one(tmp_path):
    from lib.models import load_model, save_image_model
    from lib.zoo.nets import DigitsCNN

    save_image_model(DigitsCNN(width=4), "digits-cnn", tmp_path, width=4)
    result = predict_image(load_model(str(tmp_path)), torch.rand(1, 8, 8))
    assert abs(float(result.probs.sum()) - 1) < 1e-5


def test_unknown_pieces_without_offsets():
    """A slow tokenizer (no offset mapping): each whitespace word is encoded alone and
    reported when one of its ids is the unknown token."""
    from analysis.predict import _encode

    class WordTokenizer:
        is_fast = False
        unk_token_id, all_special_ids = 0, [0, 1]
        vocab = {"<unk>": 0, "<s>": 1, "a": 2, "b": 3}

        def encode(self, word, add_special_tokens=False):
            return [self.vocab.get(word, 0)]

        def convert_ids_to_tokens(self, i):
            return {v: k for k, v in self.vocab.items()}[i]

    ids, unknown = _encode(WordTokenizer(), "a zz b <s> ?")
    assert ids == [2, 0, 3, 1, 0]
    assert unknown == [None, "zz", None, None, "?"]
