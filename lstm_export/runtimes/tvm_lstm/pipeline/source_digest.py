"""The compiler's source digest: part of every cache key (compiled folders in cache.py, plan choices
in plan_select.py), so that a changed converter or kernel in a development install never reuses
what an older one made."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

COMPILER_ROOT = Path(__file__).resolve().parent.parent  # tvm_lstm/, every stage's folder


@lru_cache(maxsize=None)
def compiler_digest(root: Path = COMPILER_ROOT) -> str:
    """sha256 of the compiler's sources (this package: converters, kernels, plan, passes, and its C)."""
    h = hashlib.sha256()
    for f in sorted([*root.rglob("*.py"), *root.rglob("*.c")]):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()
