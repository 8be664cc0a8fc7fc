"""The artifact sizes TVM's thread pool itself, so a plain load runs on the cores it was made for.

TVM's runtime starts its thread pool, on the first parallel launch of each thread, with
TVM_NUM_THREADS workers, else OMP_NUM_THREADS, else half the logical CPUs: one on a 2-vCPU
machine, where our kernels are laid out for two. No runtime call can widen a pool once it has
started (runtime.config_threadpool caps at the size it started with), so every llvm `model.so`
carries a constructor, run when the library is loaded and so before its first launch, that sets
TVM_NUM_THREADS to the target's num-cores (at most the CPUs the process may use) unless the user
set TVM_NUM_THREADS or OMP_NUM_THREADS. A pool a thread had already started keeps its size.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path

from lstm_export.common.cbuild import CBuildError, compile_c
from lstm_export.common.errors import UserError

_SOURCE = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>

/* the cores this artifact's kernels were laid out for (the target's num-cores) */
int lstm_export_cores = LSTM_EXPORT_CORES;

__attribute__((constructor)) static void lstm_export_size_thread_pool(void) {
  if (getenv("TVM_NUM_THREADS") || getenv("OMP_NUM_THREADS")) return; /* the user's choice wins */
  int n = LSTM_EXPORT_CORES;
#ifdef CPU_COUNT
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0 && CPU_COUNT(&set) < n)
    n = CPU_COUNT(&set);
#endif
  char text[16];
  snprintf(text, sizeof(text), "%d", n);
  setenv("TVM_NUM_THREADS", text, 0);
}
"""


def source(cores: int) -> str:
    """The constructor's C source for an artifact made for `cores` cores."""
    return _SOURCE.replace("LSTM_EXPORT_CORES", str(int(cores)))


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


# reentrant: the bench holds it for its whole run, and a compile inside (plan_select, bf16.measure)
# enters it again in the same thread; a plain Lock deadlocked `lstm-export bench` there
_POOL_LOCK = threading.RLock()


@contextlib.contextmanager
def pool_threads(threads: int):
    """Within this block, a TVM thread pool that starts (in this thread) starts with `threads`
    workers. TVM reads the size only from the environment, so the block sets TVM_NUM_THREADS
    under a lock and restores it on leaving; a user's own setting is left alone. For the bench
    and FMA-peak kernels, which launch before any artifact's constructor could size the pool."""
    with _POOL_LOCK:
        before = os.environ.get("TVM_NUM_THREADS")
        if before is None and "OMP_NUM_THREADS" not in os.environ:
            os.environ["TVM_NUM_THREADS"] = str(threads)
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("TVM_NUM_THREADS", None)
