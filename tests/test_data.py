import pytest
import torch

from lib import corpus, data
from lib.zoo.tokenizer import build_byte_tokenizer


def test_heldout_is_every_50th_sorted_file():
    files = corpus.stdlib_files()
    assert list(files) == sorted(files, key=lambda f: f.relative_to(corpus.stdlib_root()).as_posix())
    assert corpus.heldout_files() == files[::50]
    assert not set(corpus.heldout_files()) & set(corpus.training_files())
    assert len(corpus.heldout_files()) + len(corpus.training_files()) == len(files)
    assert all("site-packages" not in f.parts for f in files)


def test_code_batch_is_deterministic_and_starts_with_bos():
    tok = build_byte_tokenizer(128)
    a, b = data.code_batch(tok, 64, 8), data.code_batch(tok, 64, 8)
    assert a.tokens.shape == (8, 64)
    assert torch.equal(a.tokens, b.tokens)
    assert (a.tokens[:, 0] == tok.bos_token_id).all()
    assert a.n_bytes == 8 * 63  # byte tokenizer, ASCII-heavy source: one byte per token
    assert a.n_predicted == 8 * 63


def test_text_batch_errors_are_clear():
    tok = build_byte_tokenizer(128)
    with pytest.raises(data.DataError, match="empty"):
        data.text_batch(tok, "   ", 32)
    with pytest.raises(data.DataError, match="too short"):
        data.text_batch(tok, "abc", 32)
    ok = data.text_batch(tok, "x = 1\n" * 40, 32)
    assert ok.tokens.shape[1] == 32


def test_digits_split_is_stratified_and_fixed():
    tr_x, tr_y = corpus.digits_split("train")
    te_x, te_y = corpus.digits_split("heldout")
    assert tr_x.shape[1:] == (1, 8, 8) and len(tr_y) + len(te_y) == 1797
    assert set(te_y.tolist()) == set(range(10))
    assert float(tr_x.max()) <= 1.0
    noisy = data.digits_batch(denoise=True)
    assert torch.equal(noisy.images, data.digits_batch(denoise=True).images)
    assert noisy.targets is not None and not torch.equal(noisy.images, noisy.targets)


def test_repeated_tokens_mask_marks_the_copy():
    tokens, mask = data.repeated_token_sequences(4, 40, 40, 64, torch.Generator().manual_seed(0))
    for row, m in zip(tokens, mask):
        h = int(m.sum()) + 1  # the copy's first token is not marked: it is unpredictable
        assert torch.equal(row[1:1 + h], row[1 + h:1 + 2 * h])
        assert m[:2 + h].sum() == 0 and m[1 + 2 * h:].sum() == 0 and m[2 + h:1 + 2 * h].all()


def test_digest_identifies_the_content():
    tok = build_byte_tokenizer(128)
    a = data.text_batch(tok, "x = 1\n" * 40, 32)
    same = data.TextBatch(a.tokens.clone(), a.n_bytes, a.has_bos, "another description")
    assert a.digest == same.digest and len(a.digest) == 16 and int(a.digest, 16) >= 0
    other = a.tokens.clone()
    other[0, 5] += 1
    assert data.TextBatch(other, a.n_bytes, True, "t").digest != a.digest
    assert data.TextBatch(a.tokens, a.n_bytes + 1, True, "t").digest != a.digest
    mask = torch.zeros_like(a.tokens, dtype=torch.bool)
    mask[:, -1] = True
    assert data.TextBatch(a.tokens, a.n_bytes, True, "t", mask).digest != a.digest
    clean, noisy = data.digits_batch(n=8), data.digits_batch(n=8, denoise=True)
    assert clean.digest == data.digits_batch(n=8).digest
    assert len({clean.digest, noisy.digest, data.digits_batch(n=9).digest}) == 3


def test_batches_check_their_fields():
    ok = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(data.DataError, match="integers, not floats"):
        data.TextBatch(ok.float(), 0, True, "t")
    with pytest.raises(data.DataError, match="empty"):
        data.TextBatch(ok[:0], 0, True, "t")
    with pytest.raises(data.DataError, match="n_bytes"):
        data.TextBatch(ok, True, True, "t")  # a bool is no byte count
    assert data.TextBatch(ok, 0, True, "t").n_predicted == 6
    with pytest.raises(data.DataError, match="Labels must be an integer"):
        data.ImageBatch(torch.zeros(2, 1, 8, 8), torch.zeros(2), None, "t")  # float labels


def test_text_with_lone_surrogate_is_refused():
    assert data.check_text("héllo") == "héllo"
    with pytest.raises(data.DataError, match="U\\+DC80 at character 1"):
        data.check_text("a\udc80b")


def test_the_default_batch_is_sized_from_the_model(tiny_lm):
    """GPT-2 small keeps 16 windows of 256 tokens; a 1.2B-parameter model gets 2 (16 x 256
    tokens took 127 s to evaluate on Llama-3.2-1B's shape on a CPU); small models keep 16."""
    from types import SimpleNamespace

    from lib.data import default_batch

    def shaped(n_params):
        return SimpleNamespace(eval_task="text", tokenizer=tiny_lm.tokenizer, n_params=n_params,
                               structure=SimpleNamespace(n_ctx=1024))

    rows = {n: default_batch(shaped(n)).tokens.shape for n in (2_000_000, 124_000_000, 494_000_000, 1_240_000_000)}
    assert rows == {2_000_000: (16, 256), 124_000_000: (16, 256), 494_000_000: (4, 256), 1_240_000_000: (2, 256)}
    assert default_batch(shaped(1_240_000_000), n_windows=8).tokens.shape == (8, 256)  # asked for: given
