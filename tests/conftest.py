"""Shared fixtures: tiny random-weight models built locally, never from the hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


def save_tiny_gpt2(folder, n_layer: int = 3, n_embd: int = 32, n_head: int = 4, n_positions: int = 64,
                   seed: int = 0) -> None:
    """A random-weight GPT-2 with the byte tokenizer, as `save_pretrained` writes it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lib.zoo.tokenizer import BYTE_VOCAB_SIZE, save_byte_tokenizer

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=BYTE_VOCAB_SIZE, n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, bos_token_id=256, eos_token_id=256,
                        pad_token_id=256)
    GPT2LMHeadModel(config).eval().save_pretrained(str(folder))
    save_byte_tokenizer(folder, n_positions)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    save_tiny_gpt2(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tiny_gpt2_dir):
    """Session-wide read-only handle on the tiny GPT-2 (tests must not mutate it)."""
    from lib.models import load_model

    return load_model(str(tiny_gpt2_dir))
