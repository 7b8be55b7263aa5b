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
