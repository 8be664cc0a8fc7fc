"""Shared fixtures: the repo root, a small deterministic corpus, and a CLI runner in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _compile_cache_of_this_run(tmp_path_factory):
    """The compile cache (and other XDG caches) in this run's temporary folder: tests neither fill
    the user's ~/.cache nor find compiles an earlier run left there (every run starts cold, as on
    a fresh CI machine). One folder for all xdist workers; its entries are written atomically."""
    folder = tmp_path_factory.getbasetemp().parent / "xdg-cache"
    folder.mkdir(exist_ok=True)
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session", autouse=True)
def _derived_kernel_plans():
    """compile takes the plan derived from the target unless a test asks for measured selection
    (plan_budget_s, --plan-budget-s): timing plans adds seconds to every compile, and the suite
    compiles hundreds of models. tests/runtimes/test_plan_select.py tests the measuring."""
    old = os.environ.get("LSTM_EXPORT_PLAN_BUDGET_S")
    os.environ["LSTM_EXPORT_PLAN_BUDGET_S"] = "0"
    yield
    if old is None:
        os.environ.pop("LSTM_EXPORT_PLAN_BUDGET_S", None)
    else:
        os.environ["LSTM_EXPORT_PLAN_BUDGET_S"] = old


@pytest.fixture(scope="session")
def tiny_text() -> str:
    """About 12k characters of varied English-like text, the same on every machine."""
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
             "jovial bakers and fresh pumpkins glow under amber lanterns").split()
    import random
    rng = random.Random(0)
    lines = []
    for _ in range(300):
        n = rng.randint(4, 10)
        lines.append(" ".join(rng.choice(words) for _ in range(n)).capitalize() + ".")
    return "\n".join(lines) + "\n"


@pytest.fixture()
def tiny_text_file(tmp_path, tiny_text) -> Path:
    p = tmp_path / "tiny.txt"
    p.write_text(tiny_text, encoding="utf-8")
    return p


def run_cli(*args, timeout=300, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Runs `lstm-export ARGS` in a fresh interpreter; returns the completed process (text mode)."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "lstm_export.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=e, cwd=cwd or REPO)


@pytest.fixture()
def cli():
    return run_cli


def run_cli_here(*args) -> subprocess.CompletedProcess:
    """`lstm-export ARGS` in this process (no interpreter start-up: for tables of bad inputs, where
    each case is one argument parse and one check). An exception that escapes main() fails the test
    with its traceback, which is what the tables assert never happens."""
    import contextlib
    import io

    from lstm_export.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(["lstm-export", *map(str, args)], code, out.getvalue(), err.getvalue())


@pytest.fixture()
def cli_here():
    return run_cli_here
