"""One LayerScope server serves a whole class: what a visitor types must not read files
outside the model's folder, block the server, hold up other visitors' loads, or run code
the server's owner did not allow.

Each case builds its folder from the tiny GPT-2 of conftest; a load that could block runs
in a thread with a timeout, so a regression fails instead of hanging the run. After each
case the session-wide base model (`tiny_lm`) is bit-identical (its weights' hash now is
the one it was loaded with).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch

from lib import checkpoint as ckpt
from lib import models
from lib.models import load_model

from conftest import PROMPT_S, in_thread, refused

CONTENT = "Xq7-PRIVATE-CONTENT"  # what a file outside a model's folder holds; no message may show it


# ---- a shard index that names files outside the folder ----------------------------------------


def _sharded(folder: Path, outside_name: Callable[[Path], str]) -> str:
    """Turn `folder` into a one-shard checkpoint whose index also sends one tensor to the
    name `outside_name(folder)` gives; returns that name."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    name = outside_name(folder)
    weight_map = {k: "model-00001-of-00001.safetensors" for k in state}
    weight_map["transformer.h.0.ln_1.weight"] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return name


def _pickle_outside(folder: Path) -> Path:
    target = folder.parent / "other" / "pytorch_model.bin"
    torch.save({"transformer.h.0.ln_1.weight": torch.ones(32)}, target)
    return target


def _linked_file(folder: Path) -> str:
    shutil.copy(folder / "model-00001-of-00001.safetensors", folder.parent / "other" / "model.safetensors")
    (folder / "model-00002-of-00002.safetensors").symlink_to(folder.parent / "other" / "model.safetensors")
    return "model-00002-of-00002.safetensors"


def _linked_folder(folder: Path) -> str:
    shutil.copy(folder / "model-00001-of-00001.safetensors", folder.parent / "other" / "model.safetensors")
    (folder / "shards").symlink_to(folder.parent / "other", target_is_directory=True)
    return "shards/model.safetensors"


@pytest.mark.parametrize("outside_name, fragment", [
    (lambda f: (_pickle_outside(f), "../other/pytorch_model.bin")[1], "names shards outside the model's folder"),
    (lambda f: str(_pickle_outside(f)), "names shards outside the model's folder"),
    (_linked_file, "model-00002-of-00002.safetensors is a link to a file outside the model's folder"),
    (_linked_folder, "shards is a link to a folder outside the model's folder"),
], ids=["dot-dot", "absolute", "linked file", "linked folder"])
def test_shard_index_cannot_send_the_loader_outside_the_folder(lm, base, monkeypatch, outside_name, fragment):
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or pytest.fail("torch.load was called"))
    _sharded(lm, outside_name)
    message = refused(lm)  # pickles refused, as by default
    assert fragment in message and not loads
    assert "Copy" in message or "folder itself" in message


def test_a_shard_inside_the_folder_still_loads(lm, base):
    _sharded(lm, lambda f: "model-00001-of-00001.safetensors")
    assert load_model(lm).fingerprint == base.fingerprint


# ---- files that are not regular files -----------------------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_a_named_pipe_is_refused_without_blocking(lm, base, name):
    (lm / name).unlink()
    os.mkfifo(lm / name)
    message = refused(lm, fifos=(lm / name,))
    assert f"{name} is a named pipe, not a regular file" in message


def test_a_pipe_does_not_hold_up_another_load(lm, base, tiny_gpt2_dir):
    """Refused before it is opened, so nothing waits on it; the next load goes through."""
    (lm / "config.json").unlink()
    os.mkfifo(lm / "config.json")
    refused(lm, fifos=(lm / "config.json",))
    handle = in_thread(lambda: load_model(tiny_gpt2_dir))
    assert not isinstance(handle, Exception) and handle.fingerprint == base.fingerprint


DEV_ZERO_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_DATA, (3 * 2**30, 3 * 2**30))  # a regression fails here, not the machine
from lib.models import load_model
out = {}
for folder in sys.argv[1:]:
    try:
        load_model(folder)
        out[folder] = "loaded"
    except Exception as e:
        out[folder] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_a_link_to_dev_zero_is_refused(lm, base):
    """In a child process with a memory limit: a loader that reads /dev/zero grows until
    memory runs out, which would take the test run (and the machine's other work) with it."""
    import subprocess
    import sys

    folders = {}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "merges.txt"):
        folder = lm.parent / f"zero-{name}"
        shutil.copytree(lm, folder)
        if (folder / name).exists():
            (folder / name).unlink()
        (folder / name).symlink_to("/dev/zero")
        folders[str(folder)] = name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    child = subprocess.run([sys.executable, "-c", DEV_ZERO_CHILD, *folders], cwd=Path(__file__).parents[1],
                           env=env, capture_output=True, text=True, timeout=4 * PROMPT_S)
    messages = json.loads(child.stdout.strip().splitlines()[-1])
    for folder, name in folders.items():
        assert messages[folder].startswith("NoCheckpointError"), messages[folder]
        assert f"{name} is a link to a file outside the model's folder" in messages[folder]


@pytest.mark.parametrize("content", [f"{CONTENT} = 1\n", json.dumps({"token": CONTENT})], ids=["text", "json"])
def test_a_config_linked_to_another_file_is_not_read(lm, base, content):
    (lm.parent / "other" / "notes.txt").write_text(content)
    (lm / "config.json").unlink()
    (lm / "config.json").symlink_to(lm.parent / "other" / "notes.txt")
    message = refused(lm)
    assert "config.json is a link to a file outside the model's folder" in message
    assert CONTENT not in message and "notes" not in message


def test_a_config_linked_inside_the_folder_is_not_quoted(lm, base):
    (lm / "notes.txt").write_text(f"{CONTENT} = 1\n")
    (lm / "config.json").unlink()
    (lm / "config.json").symlink_to("notes.txt")
    message = refused(lm)
    assert "config.json is not valid JSON" in message and CONTENT not in message


def test_a_dangling_link_and_a_link_loop_are_refused(lm, base):
    (lm / "extra.json").symlink_to(lm / "gone.json")
    assert "extra.json is a link to a file that does not exist" in refused(lm)
    (lm / "extra.json").unlink()
    (lm / "loop.json").symlink_to(lm / "loop.json")
    assert "loop.json cannot be followed to a file" in refused(lm)


def test_files_linked_inside_the_folder_load(lm, base):
    (lm / "model.safetensors").rename(lm / "weights.data")
    (lm / "model.safetensors").symlink_to("weights.data")
    assert load_model(lm).fingerprint == base.fingerprint


def test_a_hub_cache_snapshot_may_link_into_its_blobs(lm, base, tmp_path):
    """The HF cache keeps files in models--org--name/blobs and links them from snapshots/<commit>."""
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(lm.iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    assert load_model(snapshot).fingerprint == base.fingerprint
    (tmp_path / "other" / "extra.json").write_text("{}")
    (snapshot / "extra.json").symlink_to(tmp_path / "other" / "extra.json")  # outside the repository's cache
    assert f"{'0' * 40}': extra.json is a link to a file outside the model's folder" in refused(snapshot)


def test_read_bounded_reads_no_more_than_its_limit(tmp_path):
    (tmp_path / "big.json").write_bytes(b" " * 1000)
    with pytest.raises(models.NoCheckpointError, match="far more than"):
        ckpt.read_bounded(tmp_path / "big.json", tmp_path.resolve(), "x", 999)
    assert ckpt.read_bounded(tmp_path / "big.json", tmp_path.resolve(), "x", 1000) == b" " * 1000


# ---- loads of different models do not wait on each other --------------------------------------


def test_a_stuck_download_does_not_hold_up_another_model(base, monkeypatch, tiny_gpt2_dir):
    entered, release = threading.Event(), threading.Event()

    def slow_download(name, allow_pickle, revision=None):
        entered.set()
        release.wait(300)
        return tiny_gpt2_dir

    monkeypatch.setattr(models, "_download", slow_download)
    stuck: dict[str, object] = {}
    thread = threading.Thread(target=lambda: stuck.setdefault("handle", load_model("someone/slow-model")),
                              daemon=True)
    thread.start()
    try:
        assert entered.wait(PROMPT_S)
        other = in_thread(lambda: load_model("zoo:induction-2l"))
        assert not isinstance(other, Exception) and other.kind == "causal-lm"
        assert thread.is_alive()  # the first load is still downloading
    finally:
        release.set()
        thread.join(PROMPT_S)
    assert stuck["handle"].fingerprint == base.fingerprint
    assert not models._SPEC_LOCKS  # no lock is kept once its loads are done


def test_a_stuck_file_read_does_not_hold_up_another_model(lm, base, monkeypatch, tiny_gpt2_dir):
    entered, release = threading.Event(), threading.Event()
    real = ckpt.safetensors_shapes

    def slow_shapes(path, spec, root=None):
        if Path(path).parent == lm.resolve():
            entered.set()
            release.wait(300)
        return real(path, spec, root)

    monkeypatch.setattr(ckpt, "safetensors_shapes", slow_shapes)
    thread = threading.Thread(target=lambda: load_model(lm), daemon=True)
    thread.start()
    try:
        assert entered.wait(PROMPT_S)
        other = in_thread(lambda: load_model(tiny_gpt2_dir))
        assert not isinstance(other, Exception) and other.fingerprint == base.fingerprint
    finally:
        release.set()
        thread.join(PROMPT_S)


def test_loads_of_one_model_take_turns(monkeypatch, base, tiny_gpt2_dir):
    """Two sessions asking for the same hub model download it once at a time."""
    inside, most = [0], [0]
    guard = threading.Lock()

    def download(name, allow_pickle, revision=None):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        threading.Event().wait(0.3)
        with guard:
            inside[0] -= 1
        return tiny_gpt2_dir

    monkeypatch.setattr(models, "_download", download)
    threads = [threading.Thread(target=load_model, args=("someone/tiny",), daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PROMPT_S)
    assert most[0] == 1


def test_a_multimodal_model_is_refused_and_no_load_starts_a_process(tmp_path, monkeypatch):
    """TransformerLens pip-installs torchvision for a multimodal model's processor (which
    would replace the pinned torch in the server's environment while every load waits):
    such a model is refused before anything is built, and no load starts a process."""
    import subprocess

    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from lib.errors import UnsupportedModelError
    from lib.models import load_model
    from lib.zoo.tokenizer import save_byte_tokenizer

    started = []

    def no_process(*args, **kwargs):  # recorded: TransformerLens catches what this raises
        started.append(args)
        raise OSError("no process may start during a load")

    for name in ("Popen", "check_call", "run", "call", "check_output"):
        monkeypatch.setattr(subprocess, name, no_process)
    text = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=16)
    LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=299)
                                  ).save_pretrained(str(tmp_path / "llava"))
    save_byte_tokenizer(tmp_path / "llava", 64)
    with pytest.raises(UnsupportedModelError, match="LayerScope reads text-only causal language models"):
        load_model(str(tmp_path / "llava"))
    assert load_model("zoo:induction-2l").kind == "causal-lm"  # a text model still loads
    assert not started


def test_a_tokenizer_file_listed_outside_the_folder_is_refused_before_transformers_opens_it(tmp_path):
    """transformers joins tokenizer_config.json's "fast_tokenizer_files" onto the folder
    unchecked: "tokenizer.1.json/../../etc/passwd" was opened and read (its errors told a
    visitor whether any path exists, and its first bytes)."""
    import json

    from lib.errors import NoCheckpointError
    from lib.models import load_model
    from tools.families import save_tiny

    folder = save_tiny("gpt2", tmp_path / "m", n_layers=2)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["fast_tokenizer_files"] = ["tokenizer.1.json/../../../../../../../../etc/passwd"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenizer.1.json").mkdir()
    (folder / "tokenizer.1.json" / "README.json").write_text("{}")
    with pytest.raises(NoCheckpointError, match="names the file .* which is not inside the model's folder") as e:
        load_model(str(folder))
    assert "root:" not in str(e.value)  # nothing of the file quoted


def test_an_oversized_tokenizer_file_is_refused_unread(tmp_path):
    from lib.errors import NoCheckpointError
    from lib.models import load_model
    from tools.families import save_tiny

    folder = save_tiny("gpt2", tmp_path / "m", n_layers=2)
    with open(folder / "tokenizer.json", "r+b") as f:
        f.truncate(65 << 20)  # sparse: 65 MB by its size, nothing written
    with pytest.raises(NoCheckpointError, match="tokenizer.json is larger than 64 MB"):
        load_model(str(folder))


def test_a_pasted_megabyte_prompt_is_refused_before_it_is_tokenized(tiny_lm):
    """Every prompt box tokenized the whole text before cutting it (19 MB: 34 s and 5.4 GB);
    the library reads at most MAX_PROMPT_CHARS characters of a prompt, the boxes take no more."""
    from analysis.channels import heads
    from analysis.compress.exits.inputs import prompt_exits
    from analysis.interpreter import transformer as it
    from analysis.predict import next_tokens
    from lib.data import MAX_PROMPT_CHARS
    from lib.errors import DataError

    pasted = "x = 1\n" * 200_000
    for call in (lambda: heads.prompt_tokens(tiny_lm, pasted), lambda: it.prompt_tokens(tiny_lm, pasted),
                 lambda: next_tokens(tiny_lm, pasted), lambda: prompt_exits(tiny_lm, pasted, "max_prob", 0.5)):
        with pytest.raises(DataError, match=f"at most {MAX_PROMPT_CHARS:,} are read"):
            call()
    assert it.prompt_tokens(tiny_lm, "x" * MAX_PROMPT_CHARS).shape[1] == tiny_lm.structure.n_ctx  # at the limit: cut


def test_a_copy_that_would_not_fit_in_free_memory_is_refused(tiny_lm, monkeypatch):
    """Only loads were checked against free memory; the lab's copies and the interpreter's
    float64 copy (2x a float32 model, 4x a bfloat16 one) were made unchecked."""
    import psutil

    from lib.errors import ModelTooLargeError

    class Little:
        available = 100_000  # bytes: less than the tiny model's float64 copy

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Little())
    with pytest.raises(ModelTooLargeError, match="A private copy of this model .* needs"):
        tiny_lm.private_copy(dtype=torch.float64)
    assert tiny_lm.current_fingerprint() == tiny_lm.fingerprint


def test_a_recipe_nested_hundreds_deep_is_refused_in_words(tiny_lm):
    """json.loads took it; turning its lists back into tuples recursed ~500 deep and raised a
    RecursionError, which the page shows only as a generic error."""
    import json

    from analysis.compress.export import read_recipe
    from lib.errors import RecipeError

    layers = 0
    for _ in range(500):
        layers = [layers]
    text = json.dumps({"fingerprint": tiny_lm.fingerprint, "edits": [
        {"type": "magnitude", "sparsity": 0.5, "scope": "layers", "layers": layers}]})
    with pytest.raises(RecipeError, match="nest lists more than 8 deep"):
        read_recipe(text, tiny_lm)
