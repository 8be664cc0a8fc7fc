"""Grids whose first case is in the fast subset (`pytest -m "not slow"`) and the rest marked slow:
every kernel path runs in the working loop once, the whole grid in CI."""
import pytest


def one_fast(values, multi: bool = False):
    """`values` for parametrize with all but the first marked slow; `multi` when each value is a
    tuple of several argnames' values."""
    out = []
    for i, v in enumerate(values):
        args = tuple(v) if multi else (v,)
        out.append(pytest.param(*args, marks=[] if i == 0 else [pytest.mark.slow]))
    return out
