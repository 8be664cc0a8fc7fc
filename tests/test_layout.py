"""The layout is the architecture: imports point down only, and every module imports cleanly.

Read from the source with `ast` (function-level imports included, which is where the lazy imports
of heavy libraries live), so a new arrow the wrong way fails here, not in review.
"""
import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OURS = ("common", "lstm_export", "runtimes", "harness", "serving", "cli")
# package -> the packages of ours it may import (besides itself)
ALLOWED = {
    "common": set(),
    "lstm_export": {"common"},
    "runtimes": {"common", "lstm_export"},
    "harness": {"common", "lstm_export", "runtimes"},
    "serving": {"common", "lstm_export", "runtimes"},
    "cli": {"common", "lstm_export", "runtimes", "harness", "serving"},
}
MODULES = sorted(p for pkg in OURS for p in (REPO / pkg).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Top-level packages of ours that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(OURS)


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(REPO)) for p in MODULES])
def test_imports_point_down(path):
    pkg = path.relative_to(REPO).parts[0]
    wrong = _imports(path) - ALLOWED[pkg] - {pkg}
    assert not wrong, f"{path.relative_to(REPO)} ({pkg}) imports {sorted(wrong)}; allowed: {sorted(ALLOWED[pkg])}"


def test_the_rules_catch_a_wrong_arrow(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from harness.compare import compare\n    import runtimes.base\n")
    assert _imports(bad) == {"harness", "runtimes"}


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(REPO)) for p in MODULES])
def test_every_module_imports(path):
    rel = path.relative_to(REPO).with_suffix("")
    if rel.name == "__main__":
        pytest.skip("runs the command line when imported")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    importlib.import_module(".".join(parts))


def _module_name(path: Path, root: Path = REPO) -> str:
    rel = path.relative_to(root).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _module_imports(path: Path, known: set[str], root: Path) -> set[str]:
    """Modules of ours (dotted names) that `path` imports, relative imports resolved, anywhere in
    the file: a function-level import closes a circle as surely as a top-level one."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from . import packing`
    # a name that is not a module (`from .x import f`) is dropped; the package itself is no edge
    return {m for m in found if m in known and m != name and not name.startswith(m + ".")}


def import_circles(paths, root: Path = REPO) -> list[list[str]]:
    """Every strongly connected group of two or more modules in the import graph (Tarjan)."""
    graph = {_module_name(p, root): p for p in paths}
    edges = {m: _module_imports(p, set(graph), root) for m, p in graph.items()}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    """Inside a package too: modules that share helpers take them from a module below both."""
    assert not import_circles(MODULES), f"import circles (move the shared names below both): {import_circles(MODULES)}"


def test_the_circle_check_finds_one(tmp_path):
    pkg = tmp_path / "runtimes" / "demo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import g\n")
    (pkg / "b.py").write_text("def g():\n    from . import c\n")
    (pkg / "c.py").write_text("from .a import x\n")
    (pkg / "d.py").write_text("from .a import x\n")
    circles = import_circles(sorted(pkg.glob("*.py")), tmp_path)
    assert circles == [["runtimes.demo.a", "runtimes.demo.b", "runtimes.demo.c"]]  # d only points in


def test_modules_stay_small():
    big = {str(p.relative_to(REPO)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 400}
    assert not big, f"split these by concept (about 400 lines at most): {big}"
