"""The server settings in .streamlit/config.toml are the ones their comments describe, and
streamlit reads them from the checkout (a setting that silently stays at streamlit's
default costs every user, as postScriptGC = true did: 0.27 s of CPU per rerun)."""

import json
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "server.showEmailPrompt": False,  # `streamlit run app.py` starts without input
    "server.fileWatcherType": "none",  # no recursive inotify watch over .venv
    "runner.postScriptGC": False,  # no forced gc.collect() after every run
    "browser.gatherUsageStats": False,
    "client.toolbarMode": "minimal",
    # a classroom server (README "Running LayerScope for a class")
    "client.showErrorDetails": "none",  # no traceback, exception type or message in the browser
    "server.address": "127.0.0.1",  # this machine only, until the owner exposes it deliberately
    "server.allowedHosts": ["localhost", "127.0.0.1"],  # no DNS rebinding onto the local server
    "server.maxUploadSize": 1,  # MB: a recipe JSON takes a few kB
    "server.enableXsrfProtection": True,
    "server.enableCORS": True,
}


def test_config_file_holds_the_documented_values():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    for name, value in EXPECTED.items():
        section, key = name.split(".")
        assert config[section][key] == value, name


def test_streamlit_reads_them_from_the_checkout():
    probe = ("import json, streamlit.config as c; c.get_config_options(force_reparse=True); "
             f"print(json.dumps({{k: c.get_option(k) for k in {list(EXPECTED)!r}}}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == EXPECTED


def test_every_uploader_takes_what_the_upload_cap_was_sized_for():
    """server.maxUploadSize is 1 MB because the only upload is a recipe JSON (a few kB); an
    uploader for anything else (an image, a checkpoint) must revisit that cap."""
    import ast

    uploads = []
    for path in [ROOT / "app.py", *sorted((ROOT / "ui").rglob("*.py")), *sorted((ROOT / "views").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "file_uploader":
                types = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "type"), None)
                uploads.append((path.relative_to(ROOT).as_posix(), types))
    assert uploads and all(types == ["json"] for _, types in uploads), uploads
