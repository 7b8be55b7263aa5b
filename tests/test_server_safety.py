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
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from lib import checkpoint as ckpt
from lib import models
from lib.models import load_model

CONTENT = "Xq7-PRIVATE-CONTENT"  # what a file outside a model's folder holds; no message may show it
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
    error = in_thread(lambda: load_model(spec, **options), fifos=fifos)
    assert isinstance(error, models.ModelLoadError), error
    return str(error)


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


# ---- hub repositories are measured before they are downloaded ---------------------------------


class FakeHub:
    """Stands in for huggingface_hub.HfApi: the repository's files with their sizes."""

    files: dict[str, int] = {}
    parameters: int | None = None
    asked: list[tuple[str, bool]] = []

    def model_info(self, name, *, files_metadata=False, timeout=None, **_):
        FakeHub.asked.append((name, files_metadata))
        siblings = [SimpleNamespace(rfilename=n, size=s) for n, s in self.files.items()]
        safetensors = SimpleNamespace(total=self.parameters) if self.parameters else None
        return SimpleNamespace(siblings=siblings, safetensors=safetensors, sha="a" * 40)


@pytest.fixture
def hub(monkeypatch, tiny_gpt2_dir):
    """Online hub with FakeHub's files; `downloads` lists what `_download` was asked for."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("real download"))
    monkeypatch.setattr(FakeHub, "asked", [])
    monkeypatch.setattr(FakeHub, "parameters", None)
    downloads = []

    def download(name, allow_pickle, revision=None):
        assert not models._PROCESS_STATE.locked()  # downloads never hold up other models' builds
        downloads.append((name, revision))
        return tiny_gpt2_dir

    monkeypatch.setattr(models, "_download", download)
    return downloads


GIB = 2**30


def test_an_oversized_hub_repo_is_refused_before_downloading(hub, base, monkeypatch):
    monkeypatch.setattr(FakeHub, "files", {"config.json": 700, "model.safetensors": 40 * GIB})
    message = refused("someone/huge", available_bytes=8 * GIB)
    assert "'someone/huge' is not downloaded: its files on the hub take 40.00 GiB" in message
    assert FakeHub.asked == [("someone/huge", True)] and not hub


def test_the_float32_size_the_hub_reports_counts(hub, base, monkeypatch):
    monkeypatch.setattr(FakeHub, "files", {"config.json": 700, "model.safetensors": 2 * GIB})
    monkeypatch.setattr(FakeHub, "parameters", 3 * 10**9)  # 6 GB as bf16, 12 GB as float32
    assert "its weights take 11.18 GiB as float32" in refused("someone/bf16", available_bytes=8 * GIB)
    assert not hub


def test_files_that_would_not_be_downloaded_are_not_counted(hub, base, monkeypatch):
    monkeypatch.setattr(FakeHub, "files", {"config.json": 700, "model.safetensors": 2**20,
                                           "pytorch_model.bin": 40 * GIB, "flax_model.msgpack": 40 * GIB})
    handle = load_model("someone/small", available_bytes=8 * GIB)
    assert handle.fingerprint == base.fingerprint
    assert hub == [("someone/small", "a" * 40)]  # the commit that was measured is the one downloaded
    assert "is not downloaded" in refused("someone/small", allow_pickle=True, available_bytes=8 * GIB)


def test_a_full_disk_refuses_the_download(hub, base, monkeypatch):
    monkeypatch.setattr(FakeHub, "files", {"config.json": 700, "model.safetensors": 2**20})
    monkeypatch.setattr(models, "_cache_disk_free", lambda: 1000)
    assert "the disk that holds the Hugging Face cache has only 1000 bytes free" in refused("someone/small")
    assert not hub


def test_offline_or_unreachable_hub_skips_the_check(hub, base, monkeypatch):
    from huggingface_hub import constants

    class Unreachable:
        def model_info(self, *a, **k):
            raise ConnectionError("no network")

    monkeypatch.setattr("huggingface_hub.HfApi", Unreachable)
    assert load_model("someone/tiny").fingerprint == base.fingerprint
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: pytest.fail("the hub was asked while offline"))
    assert load_model("someone/tiny").fingerprint == base.fingerprint
    assert hub == [("someone/tiny", None), ("someone/tiny", None)]


def test_an_unknown_hub_repo_is_named(hub, base, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    class Gone(RepositoryNotFoundError):
        def __init__(self) -> None:  # the hub's error without an HTTP response to build it from
            Exception.__init__(self, "404")

    class Missing:
        def model_info(self, *a, **k):
            raise Gone()

    monkeypatch.setattr("huggingface_hub.HfApi", Missing)
    assert "The Hugging Face hub has no model 'someone/nothing'" in refused("someone/nothing")
    assert not hub


# ---- the opt-ins belong to the server's owner ---------------------------------------------------


OPT_IN_ENV = ("LAYERSCOPE_ALLOW_PICKLE", "LAYERSCOPE_TRUST_REMOTE_CODE")


def _pickled(folder: Path) -> Path:
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.parametrize("offered", [False, True])
def test_messages_name_the_box_or_how_the_owner_offers_it(monkeypatch, offered):
    from ui.session import app_message

    for name in OPT_IN_ENV:
        monkeypatch.setenv(name, "1") if offered else monkeypatch.delenv(name, raising=False)
    pickle = app_message(models.PickleRefusedError("If you trust the source, load with allow_pickle=True."))
    code = app_message(models.RemoteCodeRefusedError("If you trust the source, load with trust_remote_code=True."))
    assert 'the "Allow pickled checkpoints" box under "Loading options" in the sidebar' in pickle
    assert 'the "Trust remote code" box under "Loading options" in the sidebar' in code
    assert ("LAYERSCOPE_ALLOW_PICKLE=1" in pickle) is not offered
    assert ("LAYERSCOPE_TRUST_REMOTE_CODE=1" in code) is not offered
    assert "=True" not in pickle + code


def _code_lm_unchanged() -> None:
    from ui.session import LoadRequest, load_base

    handle = load_base(LoadRequest("zoo:code-lm"))
    assert handle.current_fingerprint() == handle.fingerprint


def test_a_visitor_gets_no_opt_in_the_server_did_not_offer(monkeypatch, lm):
    from apptest_helpers import load, new_app, run

    for name in OPT_IN_ENV:
        monkeypatch.delenv(name, raising=False)
    at = run(new_app())
    assert not [c for c in at.checkbox if c.key in ("allow_pickle", "trust_code")]
    notes = " ".join(c.value for c in at.sidebar.caption)
    assert "`LAYERSCOPE_ALLOW_PICKLE=1`" in notes and "`LAYERSCOPE_TRUST_REMOTE_CODE=1`" in notes
    at.session_state["allow_pickle"] = True  # a session that holds the opt-in anyway
    load(at, str(_pickled(lm)), typed=True)
    error = " ".join(e.value for e in at.sidebar.error)
    assert "which whoever runs this server must first switch on (start it with LAYERSCOPE_ALLOW_PICKLE=1)" in error
    assert at.session_state["load_request"].spec == "zoo:code-lm"  # the loaded model stays
    _code_lm_unchanged()


def test_an_offered_opt_in_is_a_box_each_visitor_ticks(monkeypatch, lm):
    from apptest_helpers import load, new_app, run

    monkeypatch.setenv("LAYERSCOPE_ALLOW_PICKLE", "1")
    monkeypatch.delenv("LAYERSCOPE_TRUST_REMOTE_CODE", raising=False)
    at = run(new_app())
    assert at.checkbox(key="allow_pickle").value is False  # offered, not ticked
    assert not [c for c in at.checkbox if c.key == "trust_code"]
    assert "LAYERSCOPE_ALLOW_PICKLE" not in " ".join(c.value for c in at.sidebar.caption)
    folder = str(_pickled(lm))
    load(at, folder, typed=True)
    error = " ".join(e.value for e in at.sidebar.error)
    assert 'the "Allow pickled checkpoints" box under "Loading options" in the sidebar.' in error
    assert "LAYERSCOPE_ALLOW_PICKLE=1" not in error
    at.checkbox(key="allow_pickle").check()
    run(at)
    next(b for b in at.button if b.label == "Load this name or folder").click()
    run(at)
    assert at.session_state["load_request"].spec == folder and at.session_state["load_request"].allow_pickle
    _code_lm_unchanged()
