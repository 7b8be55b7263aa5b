"""Every bundled model loads offline and still meets its card (on a fast subset)."""

import json

import pytest
import torch

from lib import data
from lib.metrics import evaluate
from lib.models import load_model
from lib.zoo import ZOO, ZOO_DIR


def card(name: str) -> dict:
    return json.loads((ZOO_DIR / name / "metrics.json").read_text())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_loads_with_card(name):
    handle = load_model(f"zoo:{name}")
    assert handle.kind == ZOO[name].kind
    assert (ZOO_DIR / name / "MODEL_CARD.md").exists()
    assert handle.n_params == card(name)["params"]


def test_zoo_is_small():
    total = sum(f.stat().st_size for f in ZOO_DIR.rglob("*") if f.is_file())
    assert total < 25 * 2**20


def test_code_lm_meets_its_bar_and_card():
    handle = load_model("zoo:code-lm")
    assert card("code-lm")["bits_per_byte"] <= 1.7
    m = evaluate(handle, data.code_batch(handle.tokenizer, seq_len=256, n_windows=48))
    # a 48-window subset of the held-out files: within 0.15 bits of the card's full measurement
    assert abs(m.bits_per_byte - card("code-lm")["bits_per_byte"]) < 0.15


def test_code_lm_tokenizer_round_trips_any_utf8():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ZOO_DIR / "code-lm"))
    text = "def f(x):\n\treturn x ** 2  # żółw 🐢 ünïcode\r\n\x00"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.bos_token_id == 256


def test_induction_model_copies_and_has_the_circuit():
    from lib.zoo.train_induction import head_scores

    handle = load_model("zoo:induction-2l")
    assert card("induction-2l")["repeat_accuracy"] >= 0.95
    batch = data.repeated_tokens_batch(64, 64, 64, n=200, seed=7)
    assert evaluate(handle, batch).accuracy >= 0.95
    scores = head_scores(ZOO_DIR / "induction-2l", seed=5)  # fresh sequences, not the card's
    assert scores["layer0_previous_token_score"] > 0.5
    assert scores["layer1_induction_score"] > 0.5


def test_digits_cnn_accuracy():
    handle = load_model("zoo:digits-cnn")
    assert card("digits-cnn")["heldout_accuracy"] >= 0.97
    m = evaluate(handle, data.digits_batch(n=200))
    assert m.accuracy >= 0.97 and abs(m.accuracy - card("digits-cnn")["heldout_accuracy"]) < 0.03


def test_digits_denoiser_gain():
    handle = load_model("zoo:digits-denoiser")
    c = card("digits-denoiser")
    assert c["psnr_gain_db"] >= 6
    batch = data.digits_batch(denoise=True)  # all 450 held-out digits: still fast
    noisy = 10 * torch.log10(1 / torch.nn.functional.mse_loss(batch.images, batch.targets))
    m = evaluate(handle, batch)
    assert m.psnr_db - float(noisy) >= 6
