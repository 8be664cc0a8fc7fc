"""The one way C is built here: the native training kernel, the reduced-precision LSTM kernel and the
artifact's thread-pool constructor all go through `compile_c`, and their caches through `cached_library`.

A cached library's key holds everything its bytes depend on: the source, the flags, the compiler's
identity (its resolved path and its `--version` text, so a change of CC or a compiler upgrade never
loads a stale build) and this CPU's feature flags (a home directory shared between machines). A
build is written beside its final name and renamed into place, so concurrent builders (test workers,
two servers) never load half a file. Every cache of ours lives under `cache_root()`.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path


class CBuildError(RuntimeError):
    """The compiler failed or does not run; the message is its first error line."""


def cache_root(kind: str | None = None) -> Path:
    """$XDG_CACHE_HOME/lstm-export (else ~/.cache/lstm-export), or its subfolder `kind`."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lstm-export"
    return base / kind if kind else base


def default_compiler() -> str | None:
    """$CC, else cc or gcc on PATH; None where there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.lru_cache(maxsize=16)
def compiler_identity(cc: str) -> str:
    """What names the compiler's output: its resolved path and its `--version` text."""
    path = shutil.which(cc) or cc
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CBuildError(f"the C compiler {cc} does not run: {e}") from None
    return f"{os.path.realpath(path)}\0{version}"


@functools.lru_cache(maxsize=1)
def cpu_key() -> str:
    """This CPU's feature flags (/proc/cpuinfo), else its architecture's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine()


def compile_c(cc: str, args: list[str], timeout: float = 300) -> None:
    """Runs `cc *args`; raises CBuildError with the compiler's first error line on failure."""
    try:
        proc = subprocess.run([cc, *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        raise CBuildError(f"the C compiler {cc} does not run: {e}") from None
    if proc.returncode != 0:  # the first error line: GCC's first line is often only "In function 'f':"
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        errors = [ln for ln in lines if "error" in ln.lower()]
        raise CBuildError((errors or lines or [f"{cc} exited with status {proc.returncode}"])[0].strip()[:300])


def cached_library(kind: str, name: str, source: Path, cc: str, flags: list[str],
                   libs: tuple[str, ...] = ()) -> Path:
    """The shared library built from `source` with `cc flags`, from cache_root(kind) when this source,
    compiler, flag set and CPU built it before; else built now and renamed into place."""
    key = hashlib.sha256("\0".join([source.read_text(), compiler_identity(cc), *flags, *libs, cpu_key()])
                         .encode()).hexdigest()[:16]
    out = cache_root(kind) / f"{name}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        compile_c(cc, [*flags, "-o", tmp, str(source), *libs])  # flags hold -shared
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
