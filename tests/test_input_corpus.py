"""Bad evaluation inputs get a clear DataError before any forward (issue 17 item 4).

One table of (case, model, call, error type, message fragment). Every call runs on
a tiny model; afterwards the model's weights are bit-identical and no hook is left.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import pytest
import torch

from analysis.predict import next_tokens, predict_image
from lib import data
from lib.data import DataError, ImageBatch, TextBatch
from lib.hooks import count_hooks
from lib.metrics import evaluate, metrics_from_outputs
from lib.scoring import prepare_base
from lib.zoo.tokenizer import build_byte_tokenizer

TEXT = "def f(x):\n    return x + 1\n" * 8
LONG = torch.long


class Case(NamedTuple):
    name: str
    model: str  # "lm" (tiny GPT-2, byte tokenizer, 257 tokens, n_ctx 64) | "cnn" | "denoiser" | "induction"
    call: Callable[[Any], object]
    error: type[Exception]
    fragment: str


def text(h: Any, seq_len: int = 16, windows: int = 2) -> TextBatch:
    return data.text_batch(h.tokenizer, TEXT, seq_len, max_windows=windows)


def tokens(values: list[list[int]], n_bytes: int = 0, **kw: Any) -> TextBatch:
    return TextBatch(torch.tensor(values, dtype=LONG), n_bytes, True, "t", **kw)


def images(n: int = 4, shape: tuple[int, ...] = (1, 8, 8), targets: bool = False) -> ImageBatch:
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(0))
    return ImageBatch(x, torch.arange(n) % 10, x.clone() if targets else None, "t")


def lm_metrics(h: Any, batch: TextBatch, outputs: torch.Tensor, base: Any = None) -> object:
    return metrics_from_outputs(outputs, batch, h.n_params, h.size_bits, base)


CASES = [
    # -------------------------------------------------------------- wrong kind of batch
    Case("image batch for a language model", "lm", lambda h: evaluate(h, data.digits_batch(n=4)),
         DataError, "language model"),
    Case("text batch for a classifier", "cnn", lambda h: evaluate(h, tokens([[1, 2, 3]])),
         DataError, "image model"),
    Case("text batch for the denoiser", "denoiser", lambda h: evaluate(h, tokens([[1, 2, 3]])),
         DataError, "image model"),
    Case("denoising batch for a classifier", "cnn", lambda h: evaluate(h, data.digits_batch(n=4, denoise=True)),
         DataError, "denoising batch"),
    Case("classifier batch for the denoiser", "denoiser", lambda h: evaluate(h, data.digits_batch(n=4)),
         DataError, "no target images"),
    Case("not a batch at all", "lm", lambda h: evaluate(h, torch.zeros(2, 8, dtype=LONG)),
         DataError, "TextBatch or an ImageBatch"),
    # -------------------------------------------------------------- token ids
    Case("token id -1", "lm", lambda h: evaluate(h, tokens([[256, 5, -1, 7]])), DataError, "0..256"),
    Case("another model's id 50000", "lm", lambda h: evaluate(h, tokens([[256, 5, 50000, 7]])),
         DataError, "vocabulary of 257"),
    Case("byte-tokenizer batch on a 65-token model", "induction",
         lambda h: evaluate(h, data.text_batch(build_byte_tokenizer(64), TEXT, 16)),
         DataError, "another model's tokenizer"),
    Case("window longer than the context", "lm", lambda h: evaluate(h, tokens([[256] + [10] * 64])),
         DataError, "context of 64"),
    Case("float tokens", "lm", lambda h: TextBatch(torch.zeros(1, 8), 7, True, "t"), DataError, "integers, not floats"),
    Case("int32 tokens", "lm", lambda h: TextBatch(torch.zeros(1, 8, dtype=torch.int32), 7, True, "t"),
         DataError, "int64"),
    Case("1-D tokens", "lm", lambda h: TextBatch(torch.zeros(8, dtype=LONG), 7, True, "t"), DataError, "2-D"),
    Case("empty text batch", "lm", lambda h: TextBatch(torch.zeros(0, 8, dtype=LONG), 0, True, "t"),
         DataError, "empty"),
    Case("window of one token", "lm", lambda h: tokens([[256], [256]]), DataError, "at least 2"),
    Case("negative n_bytes", "lm", lambda h: tokens([[256, 1, 2]], n_bytes=-1), DataError, "n_bytes"),
    Case("fractional n_bytes", "lm", lambda h: tokens([[256, 1, 2]], n_bytes=2.5), DataError, "n_bytes"),
    Case("answer mask of another shape", "lm",
         lambda h: tokens([[256, 1, 2]], answer_mask=torch.ones(1, 4, dtype=torch.bool)), DataError, "answer_mask"),
    Case("answer mask with no answer", "lm",
         lambda h: tokens([[256, 1, 2]], answer_mask=torch.tensor([[True, False, False]])),
         DataError, "no predicted position"),
    # -------------------------------------------------------------- outputs and base from another batch
    Case("base from a different batch", "lm",
         lambda h: evaluate(h, text(h), base=h.forward(text(h, windows=3).tokens)), DataError, "different batch"),
    Case("prepared base from a different batch", "lm",
         lambda h: evaluate(h, text(h), base=prepare_base(h.forward(text(h, 12).tokens), text(h, 12))),
         DataError, "different batch"),
    Case("outputs from a different batch", "lm",
         lambda h: lm_metrics(h, text(h), h.forward(text(h, 12).tokens)), DataError, "do not belong together"),
    Case("base of another width than the outputs", "lm",
         lambda h: lm_metrics(h, text(h), h.forward(text(h).tokens), torch.zeros(2, 16, 50257)),
         DataError, "different batch or model"),
    Case("token ids the outputs cannot score", "lm",
         lambda h: lm_metrics(h, tokens([[0, 1, 300]]), torch.zeros(1, 3, 257)), DataError, "another model"),
    Case("base from a different image batch", "cnn",
         lambda h: evaluate(h, images(4), base=h.forward(images(5).images)), DataError, "different batch"),
    Case("labels the outputs cannot score", "cnn",
         lambda h: metrics_from_outputs(torch.zeros(2, 10), ImageBatch(torch.zeros(2, 1, 8, 8), torch.tensor([3, 10]),
                                                                        None, "t"), 1, 1),
         DataError, "labels range"),
    # -------------------------------------------------------------- building text batches
    Case("text_batch seq_len 1", "lm", lambda h: data.text_batch(h.tokenizer, TEXT, 1), DataError, "at least 2"),
    Case("text_batch max_windows 0", "lm", lambda h: data.text_batch(h.tokenizer, TEXT, 16, max_windows=0),
         DataError, "max_windows"),
    Case("code_batch seq_len 1", "lm", lambda h: data.code_batch(h.tokenizer, 1, 2), DataError, "at least 2"),
    Case("code_batch n_windows 0", "lm", lambda h: data.code_batch(h.tokenizer, 16, 0), DataError, "n_windows"),
    Case("default_batch n_windows -1", "lm", lambda h: data.default_batch(h, n_windows=-1), DataError, "n_windows"),
    Case("windows_from_ids seq_len 1 with BOS", "lm", lambda h: data.windows_from_ids([1, 2, 3], 1, 256),
         DataError, "at least 2"),
    Case("text with a lone surrogate", "lm", lambda h: data.text_batch(h.tokenizer, "ab\ud800" * 40, 16),
         DataError, "lone surrogate U+D800 at character 2"),
    # -------------------------------------------------------------- next tokens
    Case("prompt with a lone surrogate", "lm", lambda h: next_tokens(h, "x = \udcff"), DataError, "lone surrogate"),
    Case("k = 0 next tokens", "lm", lambda h: next_tokens(h, "def f", k=0), DataError, "at least 1"),
    Case("k = -3 next tokens", "lm", lambda h: next_tokens(h, "def f", k=-3), DataError, "at least 1"),
    Case("next tokens from a classifier", "cnn", lambda h: next_tokens(h, "def f"), DataError, "language model"),
    # -------------------------------------------------------------- images
    Case("image batch of 28x28 images", "cnn", lambda h: evaluate(h, images(2, (1, 28, 28))), DataError, "[1, 8, 8]"),
    Case("image batch of 3-D images", "cnn", lambda h: ImageBatch(torch.zeros(2, 8, 8), torch.arange(2), None, "t"),
         DataError, "[batch, 1, 8, 8]"),
    Case("integer images", "cnn", lambda h: ImageBatch(torch.zeros(2, 1, 8, 8, dtype=LONG), torch.arange(2), None, "t"),
         DataError, "float tensor"),
    Case("one label for two images", "cnn", lambda h: ImageBatch(torch.zeros(2, 1, 8, 8), torch.arange(1), None, "t"),
         DataError, "1 label(s)"),
    Case("targets of another shape", "denoiser",
         lambda h: ImageBatch(torch.zeros(2, 1, 8, 8), torch.arange(2), torch.zeros(1, 1, 8, 8), "t"),
         DataError, "Target images"),
    Case("empty image batch", "cnn",
         lambda h: ImageBatch(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=LONG), None, "t"), DataError, "empty"),
    Case("digits_batch n = 0", "cnn", lambda h: data.digits_batch(n=0), DataError, "at least 1"),
    Case("NaN pixels", "cnn", lambda h: evaluate(h, ImageBatch(torch.full((2, 1, 8, 8), float("nan")),
                                                                torch.arange(2), None, "t")), DataError, "NaN"),
    Case("predict_image on [8, 8]", "cnn", lambda h: predict_image(h, torch.rand(8, 8)), DataError, "[1, 8, 8]"),
    Case("predict_image on [1, 1, 8, 8]", "cnn", lambda h: predict_image(h, torch.rand(1, 1, 8, 8)),
         DataError, "[1, 8, 8]"),
    Case("predict_image on [1, 28, 28]", "denoiser", lambda h: predict_image(h, torch.rand(1, 28, 28)),
         DataError, "[1, 8, 8]"),
    Case("predict_image on a language model", "lm", lambda h: predict_image(h, torch.rand(1, 8, 8)),
         DataError, "language model"),
]


@pytest.fixture(scope="module")
def models(tiny_lm, tmp_path_factory):
    from lib.models import load_model, save_image_model
    from lib.zoo.nets import DigitsCNN, DigitsDenoiser

    handles = {"lm": tiny_lm, "induction": load_model("zoo:induction-2l")}
    for name, net, arch in (("cnn", DigitsCNN, "digits-cnn"), ("denoiser", DigitsDenoiser, "digits-denoiser")):
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        save_image_model(net(width=4), arch, folder, width=4)
        handles[name] = load_model(str(folder))
    return handles


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_clearly(models, case):
    handle = models[case.model]
    with pytest.raises(case.error) as caught:
        case.call(handle)
    assert case.fragment in str(caught.value)
    assert handle.current_fingerprint() == handle.fingerprint
    assert count_hooks(handle.model) == 0


def test_good_inputs_still_evaluate(models):
    """The edges that are legitimate: n_bytes 0 (synthetic tokens) gives no bits per
    byte; a window of exactly n_ctx tokens and the largest id are accepted."""
    lm = models["lm"]
    m = evaluate(lm, tokens([[256] + [255] * 63]))
    assert m.bits_per_byte is None and m.perplexity > 0
    assert evaluate(models["cnn"], data.digits_batch(n=3)).accuracy is not None
    assert evaluate(models["denoiser"], data.digits_batch(n=3, denoise=True)).psnr_db is not None


def test_unknown_words_are_reported(models):
    """zoo:induction-2l's word-level vocabulary (t0..t63) maps unknown words to its
    unk/BOS token; the byte tokenizer represents everything."""
    result = next_tokens(models["induction"], "hello t5 world 你好 t9 <|endoftext|>")
    assert result.unknown == ["hello", "world", "你好"]
    assert result.n_prompt_tokens == 1 + 6
    assert next_tokens(models["induction"], "t5 t9 t2").unknown == []
    assert next_tokens(models["lm"], "hello world 你好 <|endoftext|>").unknown == []
