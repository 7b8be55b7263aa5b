"""One LayerScope server serves a whole class (continued from test_server_safety): hub
repositories are measured before anything is downloaded, and the loading opt-ins belong to
whoever runs the server, not to each visitor. The `base` and `lm` fixtures and
`refused` are conftest's."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lib import models
from lib.models import load_model

from conftest import refused

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


def test_a_download_leaves_a_tenth_of_the_disk_free():
    """A download was refused only when it was larger than the free disk, so one could fill it."""
    from lib import preflight
    from lib.errors import ModelTooLargeError

    preflight.check_download("someone/fits", 89 << 20, 0, 1 << 40, 100 << 20)
    with pytest.raises(ModelTooLargeError, match="may use at most 90% of it"):
        preflight.check_download("someone/too-close", 95 << 20, 0, 1 << 40, 100 << 20)


def test_three_other_loads_do_not_push_the_default_model_out():
    """The shared cache held three models: three loads by any visitor evicted the class's model,
    which was then loaded again (twice in memory while labs still held the old one)."""
    from ui.session import DEFAULT_SPEC, LoadRequest, load_base

    default = load_base(LoadRequest(DEFAULT_SPEC))
    for spec, dtype in (("zoo:induction-2l", "auto"), ("zoo:code-lm", "bfloat16"), ("zoo:code-lm", "float16"),
                        ("zoo:digits-cnn", "auto")):
        load_base(LoadRequest(spec, dtype=dtype))
    assert load_base(LoadRequest(DEFAULT_SPEC)) is default
