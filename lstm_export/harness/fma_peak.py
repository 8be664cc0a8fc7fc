"""This machine's FP32 FMA peak, measured: the bar the bench's "% of peak" column is read against.

A kernel of `nacc` independent vector FMA chains per thread (enough to cover the FMA latency on
every port), in the vector width the LSTM kernel uses on this target (cpu_plan), on `threads`
cores at once; the best of several timed runs. It measures, it does not look up a spec sheet: a
VM's clock, turbo under load on all cores, and how many FMA ports the core has all show in it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class FmaPeak:
    gflops: float  # all threads together
    threads: int
    lanes: int
    isa: str


def fma_peak(target=None, threads: int | None = None, iters: int = 400_000, repeat: int = 7) -> FmaPeak:
    """Measures the FP32 FMA peak of `target` (default: this machine) on `threads` cores."""
    import numpy as np
    import tvm

    from lstm_export.runtimes.tvm_lstm import host_target, plan_for
    target = target or host_target(threads)
    plan = plan_for(target)
    n_threads, lanes = threads or plan.threads, plan.lanes
    key = (str(target), n_threads, lanes)
    if key not in _KERNELS:  # bench measures again after every shape: compiled once per target
        _KERNELS[key] = _peak_kernel(target, n_threads, lanes)
    f = _KERNELS[key]
    a = tvm.runtime.tensor(np.ones((n_threads, NACC * lanes), np.float32))
    f(a, 1000)  # warm-up: starts the thread pool
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        f(a, iters)
        best = min(best, time.perf_counter() - t0)
    return FmaPeak(round(2 * lanes * NACC * iters * n_threads / best / 1e9, 1), n_threads, lanes, plan.isa)


NACC = 12  # independent chains: >= latency (4) x FMA ports (2), and within 16 registers


_KERNELS: dict = {}  # (str(target), threads, lanes) -> the compiled kernel


def _peak_kernel(target, n_threads: int, lanes: int):
    import tvm
    from tvm.script import tirx as T
    nacc = NACC
    assert nacc * lanes * 4 < 1024  # the accumulators stay a stack buffer (registers), see cpu_plan

    @T.prim_func
    def peak(a: T.Buffer((n_threads, nacc * lanes), "float32"), n_iter: T.int32):
        T.func_attr({"global_symbol": "peak", "tirx.noalias": True})
        for i in T.parallel(n_threads):
            acc = T.alloc_buffer((nacc, lanes), "float32", scope="global")
            for j in T.unroll(nacc):
                for v in T.vectorized(lanes):
                    acc[j, v] = a[i, j * lanes + v]
            for _ in T.serial(n_iter):
                for j in T.unroll(nacc):
                    for v in T.vectorized(lanes):
                        acc[j, v] = acc[j, v] * T.float32(0.9999999) + T.float32(1e-7)
            for j in T.unroll(nacc):
                for v in T.vectorized(lanes):
                    a[i, j * lanes + v] = acc[j, v]

    return tvm.compile(tvm.IRModule({"peak": peak}), target=target)["peak"]
