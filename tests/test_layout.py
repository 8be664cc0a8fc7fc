"""The layout is the architecture: imports point down only, and every module imports cleanly.

Read from the source with `ast` (function-level imports included, which is where the lazy imports
of heavy libraries live), so a new arrow the wrong way fails here, not in review.
"""
import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "lstm_export"
# Everything installs under the one name `lstm_export`; each subpackage named here is a floor, and
# the modules directly in lstm_export/ (model, reference, data, training, export) are the producer.
SUBFLOORS = ("common", "runtimes", "harness", "serving", "cli")
# floor -> the floors it may import (besides itself)
ALLOWED = {
    "common": set(),
    "producer": {"common"},
    "runtimes": {"common", "producer"},
    "harness": {"common", "producer", "runtimes"},
    "serving": {"common", "producer", "runtimes"},
    "cli": {"common", "producer", "runtimes", "harness", "serving"},
}
MODULES = sorted(PACKAGE.rglob("*.py"))


def floor_of(module: str) -> str | None:
    """The floor of a dotted module name of ours (None: not ours)."""
    parts = module.split(".")
    if parts[0] != "lstm_export":
        return None
    if parts[1:] == ["__main__"]:  # `python -m lstm_export`: the command line's entry point
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in SUBFLOORS else "producer"


def _imports(path: Path) -> set[str]:
    """Floors of ours that `path` imports, anywhere in the file, relative imports resolved."""
    return {f for m in _module_imports(path, None, REPO) if (f := floor_of(m))}


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(REPO)) for p in MODULES])
def test_imports_point_down(path):
    floor = floor_of(_module_name(path))
    wrong = _imports(path) - ALLOWED[floor] - {floor}
    assert not wrong, f"{path.relative_to(REPO)} ({floor}) imports {sorted(wrong)}; allowed: {sorted(ALLOWED[floor])}"


def test_the_rules_catch_a_wrong_arrow(tmp_path):
    pkg = tmp_path / "lstm_export" / "runtimes"
    pkg.mkdir(parents=True)
    bad = pkg / "m.py"
    bad.write_text("def f():\n    from lstm_export.harness.compare import compare\n    import lstm_export.model\n"
                   "from ..cli import main\nfrom . import base\n")
    assert {f for m in _module_imports(bad, None, tmp_path) if (f := floor_of(m))} == {
        "harness", "producer", "cli", "runtimes"}


def test_nothing_imports_the_old_top_level_names():
    """`common`, `runtimes`, ... moved under lstm_export: a leftover absolute import of the old name would
    work only from a checkout's root, never from the installed wheel."""
    old = [(str(p.relative_to(REPO)), m) for p in [*MODULES, *sorted((REPO / "tests").rglob("*.py"))]
           for m in _module_imports(p, None, REPO) if m.split(".")[0] in SUBFLOORS]
    assert not old, f"import these as lstm_export.<name>: {old}"


# The TVM compiler's stages, in runtimes/tvm_lstm/: each may import the ones before it (and the
# package's own __init__, which holds only TVMScript's speed-ups), never the ones after.
COMPILER = PACKAGE / "runtimes" / "tvm_lstm"
STAGES = ("target", "kernels", "frontend", "pipeline")
COMPILER_MODULES = sorted(p for p in COMPILER.rglob("*.py") if p.parent != COMPILER)


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:3] != ["lstm_export", "runtimes", "tvm_lstm"] or len(parts) < 4:
        return None
    return parts[3] if parts[3] in STAGES else "?"


@pytest.mark.parametrize("path", COMPILER_MODULES, ids=[str(p.relative_to(COMPILER)) for p in COMPILER_MODULES])
def test_the_compiler_stages_import_down(path):
    stage = stage_of(_module_name(path))
    assert stage in STAGES, f"{path.relative_to(REPO)} is in no stage folder ({', '.join(STAGES)})"
    allowed = set(STAGES[:STAGES.index(stage) + 1])
    wrong = {s for m in _module_imports(path, None, REPO) if (s := stage_of(m)) and s not in allowed}
    assert not wrong, f"{path.relative_to(REPO)} ({stage}) imports {sorted(wrong)}; allowed: {sorted(allowed)}"


def test_the_compiler_folder_keeps_its_modules_in_stages():
    """At most a handful of modules directly in tvm_lstm/ (#50 asks for 10 at most): today only the
    package's __init__."""
    flat = sorted(p.name for p in COMPILER.glob("*.py"))
    assert len(flat) <= 10 and flat == ["__init__.py"], flat


def _tvmscript(fn: ast.FunctionDef) -> bool:
    """A TVMScript macro or PrimFunc (`@T.macro`, `@T.prim_func(...)`): its parameters are buffers."""
    for d in fn.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if isinstance(target, ast.Attribute) and target.attr in ("macro", "prim_func"):
            return True
    return False


def test_no_function_in_runtimes_is_too_long_or_takes_too_many_parameters():
    """#50's goal, checkable by anyone: no function in lstm_export/runtimes/ over 100 lines or over 10
    parameters (TVMScript macros and PrimFuncs aside, whose buffers are their arguments)."""
    over = []
    for path in sorted((PACKAGE / "runtimes").rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or _tvmscript(fn):
                continue
            a = fn.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
            n = len([p for p in params if p.arg not in ("self", "cls")])
            lines = fn.end_lineno - fn.lineno + 1
            if lines > 100 or n > 10:
                over.append(f"{path.relative_to(REPO)}:{fn.lineno} {fn.name}: {lines} lines, {n} parameters")
    assert not over, over


OUTSIDE_COMPILER = [p for p in MODULES if COMPILER not in p.parents and p.parent != COMPILER]


def test_code_outside_the_compiler_takes_only_its_public_names():
    """Outside runtimes/tvm_lstm/ the package imports the compiler from `lstm_export.runtimes.tvm_lstm`
    only (its __init__'s public names), never a stage folder's module: the stages can move inside
    without breaking their users. Every public name resolves."""
    import lstm_export.runtimes.tvm_lstm as compiler
    reaching = [(str(p.relative_to(REPO)), m) for p in OUTSIDE_COMPILER for m in _module_imports(p, None, REPO)
                if stage_of(m) in STAGES]
    assert not reaching, f"take these from lstm_export.runtimes.tvm_lstm: {reaching}"
    missing = [n for n in compiler.__all__ if getattr(compiler, n, None) is None]
    assert not missing, missing


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(REPO)) for p in MODULES])
def test_every_module_imports(path):
    if path.stem == "__main__":
        pytest.skip("runs the command line when imported")
    importlib.import_module(_module_name(path))


def _module_name(path: Path, root: Path = REPO) -> str:
    rel = path.relative_to(root).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _module_imports(path: Path, known: set[str] | None, root: Path) -> set[str]:
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
    # a name that is not a module (`from .x import f`) is dropped (known=None keeps every name); the
    # package itself is no edge
    return {m for m in found if (known is None or m in known) and m != name and not name.startswith(m + ".")}


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


def test_the_package_name_does_not_import_torch():
    """`lstm_export/__init__.py` loads the producer's names on first use: a runtime's or a server's
    import of lstm_export.runtimes does not pay for torch, and `from lstm_export import LSTM` still works."""
    import subprocess
    import sys
    code = ("import sys, lstm_export.runtimes.base, lstm_export.common.errors; assert 'torch' not in sys.modules, 1; "
            "from lstm_export import LSTM, UserError; assert 'torch' in sys.modules and LSTM.__name__ == 'LSTM'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
