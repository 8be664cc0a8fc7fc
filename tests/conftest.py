"""Shared fixtures: the repo root, a small deterministic corpus, and a CLI runner in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


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
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=e, cwd=cwd or REPO)


@pytest.fixture()
def cli():
    return run_cli
