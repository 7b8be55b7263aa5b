"""The shape of the house: analysis/ and lib/ never import streamlit, no module is longer
than STYLE's ~400 lines, analysis/ keeps its top level small (one package per view), and
the project's modules import each other without a circle."""

import ast
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


def project_files(tests: bool = False) -> list[Path]:
    """Every module of the app, its library, bench and tools (and the tests, if asked)."""
    files = [ROOT / "app.py"]
    for package in PACKAGES + ("bench", "tools") + (("tests",) if tests else ()):
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in project_files(tests=True)
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


def test_analysis_keeps_few_modules_at_its_top_level():
    top = sorted(p.name for p in (ROOT / "analysis").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL_ANALYSIS, f"analysis/ holds {len(top)} modules directly: {top}"


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in its text: at the top, inside
    functions and under `if TYPE_CHECKING` (a circle through any of them is still a circle
    a reader has to untangle). `from a.b import c` counts as importing a.b.c when that is a
    module, else a.b. Importing a submodule also runs its packages' __init__ files; those
    edges are left out, or every package whose __init__ imports its own modules would be
    a circle."""
    files = [p for p in project_files() if p.relative_to(ROOT).parts[0] in PACKAGES or p.name == "app.py"]
    modules = {module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                           else node.module for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_imports_everywhere():
    graph = import_graph()
    assert "lib.handle" in graph["lib.lm_handle"]  # a top-level import
    assert "lib.models" in graph["lib.zoo.train_digits"]  # a package's module, by its full name
    assert len(graph) > 80


def test_no_import_circle_among_project_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_imports_go_one_way():
    """lib <- analysis <- ui <- views / app: a layer imports only the layers below it."""
    rank = {"lib": 0, "analysis": 1, "ui": 2, "views": 3, "app": 3}
    upward = sorted(f"{a} -> {b}" for a, edges in import_graph().items() for b in edges
                    if rank[b.split(".")[0]] > rank[a.split(".")[0]])
    assert not upward, upward
