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


def test_modules_stay_small():
    big = {str(p.relative_to(REPO)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 400}
    assert not big, f"split these by concept (about 400 lines at most): {big}"
