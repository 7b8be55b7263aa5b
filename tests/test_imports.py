"""The shape of the house: analysis/ and lib/ never import streamlit, no module is longer
than STYLE's ~400 lines, and analysis/ keeps its top level small (one package per view)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lib", "analysis", "ui", "views")
MAX_LINES = 400
MAX_TOP_LEVEL_ANALYSIS = 6


def test_analysis_and_lib_do_not_import_streamlit():
    code = (
        "import sys, pkgutil, importlib, analysis, lib\n"
        "for pkg in (analysis, lib):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if not m.name.startswith('lib.zoo.train'):\n"
        "            importlib.import_module(m.name)\n"
        "assert 'streamlit' not in sys.modules, 'streamlit was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def project_files() -> list[Path]:
    """Every module of the app and its library (tests are not counted)."""
    files = [ROOT / "app.py"]
    for package in PACKAGES + ("bench", "tools"):
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in project_files()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


def test_analysis_keeps_few_modules_at_its_top_level():
    top = sorted(p.name for p in (ROOT / "analysis").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL_ANALYSIS, f"analysis/ holds {len(top)} modules directly: {top}"
