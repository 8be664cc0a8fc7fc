"""One timing loop and one ratio, for the CPU bench, the GPU bench, the model bench and the deployed
artifact's worker (which runs this function's own source, so its loop is this one)."""
from __future__ import annotations


def time_runs(fn, warmup=3, min_runs=10, min_s=1.0, max_runs=500, max_s=20.0, sync=None, block_s=0.0,
              before=None):
    """Seconds per call of `fn` after `warmup` calls: at least min_runs samples and min_s seconds,
    at most max_runs samples or max_s seconds.

    With `sync` (a device synchronize: a GPU call returns before its kernels finish) every sample
    is a block of calls between two syncs, as many as fill `block_s` seconds (one launch is shorter
    than the clock's resolution), divided by their number. `before`, if given, runs before every
    sample, untimed (a disturbance: another runtime's call right before each timed one).
    """
    import time  # inside: the deployed worker runs this function's source on its own
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    n = 1
    if block_s > 0:
        t0 = time.perf_counter()
        fn()
        sync()
        n = max(1, int(block_s / max(time.perf_counter() - t0, 1e-6)))
    times, start = [], time.perf_counter()
    while len(times) < max_runs:
        if before is not None:
            before()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / n)
        spent = time.perf_counter() - start
        if (len(times) >= min_runs and spent >= min_s) or spent >= max_s:
            break
    return times


def ratio_to_best(value: float | None, peers) -> float | None:
    """value / the smallest of `peers` (None values ignored), 4 significant digits (3 decimals made
    a tiny entry against a slow peer 0.0); None without either."""
    best = min((p for p in peers if p is not None), default=None)
    return None if value is None or not best else float(f"{value / best:.4g}")
