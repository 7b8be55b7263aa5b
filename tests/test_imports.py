import subprocess
import sys


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
