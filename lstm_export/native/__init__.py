"""The native LSTM kernel (lstm_kernel.c): the time loop and its derivative in C, built once per
machine with the system C compiler and loaded with ctypes; GEMMs outside the loop go to the BLAS
that numpy has already loaded (OpenBLAS in numpy's wheels).

`kernel()` returns the loaded `Kernel`, or None with `unavailable_reason()` saying why (no C
compiler, no BLAS found, not Linux, LSTM_EXPORT_NATIVE=0); callers then take the autograd path,
which computes the same numbers more slowly. Nothing is downloaded: the source ships with the
package and is compiled here.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from lstm_export.common.errors import first_line

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("lstm_kernel.c")
# -fno-trapping-math keeps the activations' selects branch-free (vectorizable); -march=native: the
# library is built on the machine that runs it and cached under a key that includes its CPU flags.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-fPIC", "-shared"]


class Blas(ctypes.Structure):
    """The kernel's blas_t: the caller's cblas_sgemm / cblas_dgemm and OpenBLAS's thread setter."""

    _fields_ = [("sgemm", ctypes.c_void_p), ("dgemm", ctypes.c_void_p), ("set_threads", ctypes.c_void_p),
                ("ilp64", ctypes.c_int)]


@dataclass(frozen=True)
class Kernel:
    """The loaded library, the BLAS it calls, and the packed panel width of its float32 GEMM."""

    lib: ctypes.CDLL
    blas: Blas
    blas_path: str
    panel: int

    @property
    def threads_ok(self) -> bool:
        """Whether BLAS calls from several of our threads run single-threaded (else use one thread)."""
        return bool(self.blas.set_threads)


_reason: list[str] = []  # why kernel() is None; filled once, by the first call


def unavailable_reason() -> str | None:
    kernel()
    return _reason[0] if _reason else None


@functools.lru_cache(maxsize=1)
def kernel() -> Kernel | None:
    """The native kernel, built on first use and cached per machine; None where it cannot be."""
    why = None
    if os.environ.get("LSTM_EXPORT_NATIVE", "1") == "0":
        why = "LSTM_EXPORT_NATIVE=0"
    elif platform.system() != "Linux":
        why = f"the native kernel is built for Linux only, not {platform.system()}"
    if why is None:
        try:
            blas, path = _find_blas()
            lib = ctypes.CDLL(str(_build()))
            _declare(lib)
            return Kernel(lib, blas, path, int(lib.panel_width()))
        except (OSError, RuntimeError) as e:
            why = first_line(e)
    _reason.append(why)
    log.debug("native LSTM kernel unavailable: %s", why)
    return None


def _build() -> Path:
    """Compiles lstm_kernel.c unless this source, compiler, flag set and CPU built it before (the key:
    common.cbuild.cached_library); returns the library's path."""
    from lstm_export.common.cbuild import CBuildError, cached_library, default_compiler
    cc = default_compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH to build the native LSTM kernel; set CC")
    try:
        out = cached_library("native", "lstm_kernel", SOURCE, cc, FLAGS, ("-lm",))
    except CBuildError as e:
        raise RuntimeError(f"building the native LSTM kernel failed ({cc}): {e}") from None
    log.debug("native kernel: %s", out)
    return out


def _find_blas() -> tuple[Blas, str]:
    """cblas_?gemm from a BLAS already mapped into this process (numpy's), ILP64 names first."""
    import numpy as np  # noqa: F401  (loads numpy's BLAS)
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError as e:
        raise RuntimeError(f"cannot list loaded libraries to find a BLAS: {e}") from None
    paths = []
    for line in maps:
        path = line.split(maxsplit=5)[-1] if len(line.split()) >= 6 else ""
        name = os.path.basename(path).lower()
        if ("blas" in name or "mkl_rt" in name) and path not in paths:
            paths.append(path)
    names = (("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_", 1), ("cblas_sgemm64_", "cblas_dgemm64_", 1),
             ("cblas_sgemm", "cblas_dgemm", 0))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for s, d, ilp64 in names:
            if hasattr(lib, s) and hasattr(lib, d):
                setter = getattr(lib, "openblas_set_num_threads_local", None)
                address = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
                return Blas(address(getattr(lib, s)), address(getattr(lib, d)),
                            address(setter) if setter is not None else None, ilp64), path
    raise RuntimeError("no BLAS with cblas_sgemm is loaded (numpy's OpenBLAS was expected)")


def _declare(lib: ctypes.CDLL) -> None:
    P, I64, CI = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.panel_width.restype = I64
    lib.pack_panels.argtypes = [I64, I64, P, I64, P]
    lib.parallel_packed_gemm.argtypes = [CI, I64, I64, I64, P, I64, P, P, I64]
    lib.parallel_packed_gemm.restype = None
    for s, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        getattr(lib, f"parallel_gemm_{s}").argtypes = [P, CI, CI, CI, I64, I64, I64, P, I64, P, I64, real, P, I64]
        getattr(lib, f"lstm_forward_{s}").argtypes = [P, CI, P, I64, I64, I64, P, CI, P, P, P, P, P, P, P, P, P, P]
        getattr(lib, f"lstm_backward_{s}").argtypes = [P, CI, P, I64, I64, I64, P, CI, P, P, P, P, P, P, P, P, P]
        for f in ("parallel_gemm", "lstm_forward", "lstm_backward"):
            getattr(lib, f"{f}_{s}").restype = None
