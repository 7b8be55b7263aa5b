"""Shared fixtures: tiny random-weight models built locally, never from the hub."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the lab journal (analysis.compress.journal) writes here, never to the home folder; servers the tests start inherit it
os.environ["LAYERSCOPE_DATA"] = tempfile.mkdtemp(prefix="layerscope-test-data-")

import threading
from pathlib import Path
from typing import Callable

import pytest
import torch

atexit.register(shutil.rmtree, os.environ["LAYERSCOPE_DATA"], True)
if os.environ.get("PYTEST_XDIST_WORKER"):  # the suite's workers (pytest.ini) share the cores instead of each taking all
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


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


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, request):
    """A tiny GPT-2 folder of the test module's own (its path is its own model spec in the app)."""
    folder = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_") + "-gpt2")
    save_tiny_gpt2(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_lm(tiny_gpt2_dir):
    """Session-wide read-only handle on the tiny GPT-2 (tests must not mutate it)."""
    from lib.models import load_model

    return load_model(str(tiny_gpt2_dir))


@pytest.fixture(scope="session")
def tiny_cnn(tmp_path_factory):
    """Session-wide read-only handle on a width-4 digits CNN with seeded random weights,
    saved and loaded like a user's folder."""
    from lib.models import load_model, save_image_model
    from lib.zoo.nets import DigitsCNN

    folder = tmp_path_factory.mktemp("cnn")
    torch.manual_seed(0)
    save_image_model(DigitsCNN(width=4), "digits-cnn", folder, width=4)
    return load_model(str(folder))


# ---- the shared-server tests (test_server_safety, test_server_hub) ---------------------------

PROMPT_S = 60  # a refused load answers in well under a second; a blocked one never does


@pytest.fixture
def base(tiny_lm):
    """The session's read-only base model; checked unchanged after the test."""
    yield tiny_lm
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint


@pytest.fixture
def lm(tmp_path, tiny_gpt2_dir) -> Path:
    """A fresh copy of the tiny GPT-2 folder, inside tmp_path/model (tmp_path/other is outside it)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, folder)
    (tmp_path / "other").mkdir()
    return folder


def in_thread(fn: Callable[[], object], timeout: float = PROMPT_S, fifos: tuple[Path, ...] = ()) -> object:
    """What `fn()` returns or raises, run in a thread; fails the test if it takes longer than
    `timeout` (first opening each of `fifos` for writing, so a reader blocked on one wakes up)."""
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result["value"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(10)
        pytest.fail(f"the call was still running after {timeout} s")
    return result["value"]


def refused(spec: object, *, fifos: tuple[Path, ...] = (), **options: object) -> str:
    """The message of the LoadError that loading `spec` gives, promptly."""
    from lib import models

    error = in_thread(lambda: models.load_model(spec, **options), fifos=fifos)
    assert isinstance(error, models.ModelLoadError), error
    return str(error)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """A tiny random-weight checkpoint folder of every family in `tools.families`."""
    from tools.families import FAMILIES, save_tiny

    root = tmp_path_factory.mktemp("families")
    return {name: save_tiny(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="session")
def family_handles(family_dirs):
    """Each family's folder loaded as a user's folder is (read-only: tests must not mutate them)."""
    from lib.models import load_model

    return {name: load_model(str(folder)) for name, folder in family_dirs.items()}


@pytest.fixture(scope="session")
def plain_models(family_dirs):
    """Each family's folder loaded again by plain transformers (the independent reference)."""
    import family_refs

    return {name: family_refs.plain_model(folder) for name, folder in family_dirs.items()}
