"""The layout holds: no import circles, the library imports nothing from its applications, and
``import looptrace`` works without the optional packages (read from the source, so it stays true)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import looptrace as lt

SRC = Path(__file__).resolve().parents[1] / "src"
APP_PREFIXES = ("looptrace.apps", "looptrace.cli")


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path = SRC) -> set[str]:
    """Every looptrace module ``path`` imports, at any depth of the file (lazy imports included)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in out if m.startswith("looptrace")}


def graph(root: Path = SRC) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    return {name: {m for m in imports(path, root) if m in files and m != name} for name, path in files.items()}


def app_imports_in_library(g: dict[str, set[str]]) -> dict[str, list[str]]:
    bad = {mod: sorted(m for m in deps if m.startswith(APP_PREFIXES)) for mod, deps in g.items()}
    return {k: v for k, v in bad.items() if v and not k.startswith(APP_PREFIXES)}


def find_circle(g: dict[str, set[str]]) -> list[str]:
    # a package's __init__ importing its own submodules is how packages re-export, and importing a module
    # always imports its ancestor packages first: neither is a circle
    edges = {m: {d for d in deps if not d.startswith(m + ".") and not m.startswith(d + ".")} for m, deps in g.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycle.extend([*path[path.index(dep) :], dep] if dep in path else [node, dep])
                return True
            if state.get(dep) is None and visit(dep, [*path, dep]):
                return True
        state[node] = 2
        return False

    for mod in sorted(edges):
        if state.get(mod) is None and visit(mod, [mod]):
            break
    return cycle


def test_the_library_imports_nothing_from_the_applications() -> None:
    bad = app_imports_in_library(graph())
    assert not bad, f"library modules import the application layer (move the code, or invert the dependency): {bad}"


def test_no_import_circles() -> None:
    cycle = find_circle(graph())
    assert not cycle, f"import circle: {' -> '.join(cycle)}"


def test_the_checks_find_planted_faults(tmp_path) -> None:
    pkg = tmp_path / "looptrace"
    (pkg / "apps").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "apps" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from looptrace.b import g\n")  # a lazy import counts
    (pkg / "b.py").write_text("from looptrace import a\nimport looptrace.apps.x\n")
    (pkg / "apps" / "x.py").write_text("import looptrace.a\n")
    g = graph(tmp_path)
    assert find_circle(g), "a circle a -> b -> a was not found"
    assert app_imports_in_library(g) == {"looptrace.b": ["looptrace.apps.x"]}


def test_import_looptrace_needs_no_optional_package() -> None:
    """The optional packages are blocked; the library and its store still import."""
    code = (
        "import sys\n"
        "for m in ('matplotlib', 'scipy', 'faiss', 'transformers', 'lightning', 'pytorch_lightning'):\n"
        "    sys.modules[m] = None\n"
        "import looptrace, looptrace.store, looptrace.analysis.applications, looptrace.evaluation\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)})
    assert r.returncode == 0 and "ok" in r.stdout, f"the library needs an optional package:\n{r.stderr[-2000:]}"


def test_every_public_name_resolves() -> None:
    missing = [n for n in lt.__all__ if not hasattr(lt, n)]
    assert not missing, f"looptrace.__all__ names {missing}, which do not exist"
    for name in ("featurize", "sdi", "attribute", "SketchSpec", "Checkpoint", "tracin", "step_matrix", "loop_step"):
        assert name in lt.__all__, f"public name {name!r} disappeared"
