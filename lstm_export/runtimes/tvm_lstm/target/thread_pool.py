"""The C object linked into every llvm model.so (thread_pool.c): it sizes TVM's thread pool, so a
plain load runs on the cores the kernels were made for, and it routes the generated code's parallel
launches and barriers through a policy that shares the cores with the rest of the process.

TVM's runtime starts its thread pool, on the first parallel launch of each thread, with
TVM_NUM_THREADS workers, else OMP_NUM_THREADS, else half the logical CPUs: one on a 2-vCPU
machine, where our kernels are laid out for two. No runtime call can widen a pool once it has
started (runtime.config_threadpool caps at the size it started with), so the object's constructor,
run when the library is loaded and so before its first launch, sets TVM_NUM_THREADS to the
target's num-cores (at most the CPUs the process may use) unless the user set TVM_NUM_THREADS or
OMP_NUM_THREADS, and bounds the pool's spin after a launch (TVM_THREAD_POOL_SPIN_COUNT). A pool a
thread had already started keeps its size. The generated code's parallel loops run on
thread_pool.c's own claiming pool, of the same size; its comment has the why.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import threading
from pathlib import Path

from lstm_export.common.cbuild import CBuildError, compile_c
from lstm_export.common.errors import UserError

_SOURCE = Path(__file__).with_name("thread_pool.c")


def source(cores: int) -> str:
    """The constructor's C source for an artifact made for `cores` cores."""
    return _SOURCE.read_text().replace("LSTM_EXPORT_CORES", str(int(cores)))


def spin_count() -> str:
    """The TVM_THREAD_POOL_SPIN_COUNT an artifact sets (thread_pool.c's SPIN_COUNT)."""
    return re.search(r'#define SPIN_COUNT "(\d+)"', _SOURCE.read_text()).group(1)


def compiler_for(triple: str, host_triple: str) -> str | None:
    """The C compiler that makes objects for `triple`: the host's own for the host's architecture,
    else `<triple>-gcc` where it is installed; None where there is none."""
    from .targets import arch_of
    if arch_of(triple) == arch_of(host_triple):
        return shutil.which("gcc") or shutil.which("cc")
    for name in (f"{triple}-gcc", f"{arch_of(triple)}-linux-gnu-gcc"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def thread_pool_object(workdir: str | Path, cores: int, cc: str) -> Path:
    """Compiles the constructor for `cores` with `cc`; returns the object file to link in."""
    src = Path(workdir) / "lstm_export_threads.c"
    obj = src.with_suffix(".o")
    src.write_text(source(cores))
    try:
        compile_c(cc, ["-c", "-fPIC", "-O2", "-o", str(obj), str(src)])
    except CBuildError as e:
        raise UserError(f"{cc} could not compile the artifact's thread-pool constructor: {e}") from None
    return obj


# reentrant: the bench holds it for its whole run, and a compile inside (plan_select, engine.measure)
# enters it again in the same thread; a plain Lock deadlocked `lstm-export bench` there
_POOL_LOCK = threading.RLock()


@contextlib.contextmanager
def pool_threads(threads: int):
    """Within this block, a TVM thread pool that starts (in this thread) starts with `threads`
    workers. TVM reads the size only from the environment, so the block sets TVM_NUM_THREADS
    under a lock and restores it on leaving; a user's own setting is left alone. For the bench
    and FMA-peak kernels, which launch before any artifact's constructor could size the pool."""
    with _POOL_LOCK:
        set_here = {}
        if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
            set_here["TVM_NUM_THREADS"] = str(threads)
        if "TVM_THREAD_POOL_SPIN_COUNT" not in os.environ:  # as an artifact's constructor sets it
            set_here["TVM_THREAD_POOL_SPIN_COUNT"] = spin_count()
        os.environ.update(set_here)
        try:
            yield
        finally:
            for key in set_here:
                os.environ.pop(key, None)


def _set_flag(library, name: str, value: int) -> None:
    """One of thread_pool.c's int flags in a loaded model.so (loading the same path again hands back
    the loaded library, so this sets the running artifact's own)."""
    ctypes.c_int.in_dll(ctypes.CDLL(str(library)), f"lstm_export_{name}").value = int(value)


def share_cores(library, on: bool) -> None:
    """Turns thread_pool.c's claiming pool and launch policy on or off in a loaded model.so (off:
    TVM's launches and barriers as they are, as LSTM_EXPORT_SHARE_CORES=0 at load); for A/B
    timings in one process."""
    _set_flag(library, "share_cores", on)


def one_task(library, on: bool) -> None:
    """Runs every parallel loop of a loaded model.so on the calling thread, as one task (the same
    bits): the one-core floor the shared-cores bench sets a disturbed call against."""
    _set_flag(library, "one_task", on)
