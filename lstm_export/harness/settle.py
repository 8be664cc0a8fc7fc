"""`settle`: a timing block starts once the process's other threads are quiet, so that no runtime
inherits the cores of the one timed before it (a pool spinning after its run)."""
from __future__ import annotations

import glob
import threading
import time
from pathlib import Path


def _thread_ns(exclude: int) -> int:
    """CPU nanoseconds every thread of this process but `exclude` has run (/proc schedstat)."""
    total = 0
    for path in glob.glob("/proc/self/task/*/schedstat"):
        if path.split("/")[4] == str(exclude):
            continue
        try:
            total += int(Path(path).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended while we read
    return total


def settle(max_s: float = 3.0, window_s: float = 0.01, idle_fraction: float = 0.05) -> float:
    """Waits until the process's other threads (thread pools spinning after a run) used under
    `idle_fraction` of one core for one `window_s` window, at most `max_s`; returns the seconds waited.
    Each timing block starts here, so no runtime inherits the cores of the one timed before it."""
    me, start = threading.get_native_id(), time.perf_counter()
    before = _thread_ns(me)
    while time.perf_counter() - start < max_s:
        time.sleep(window_s)
        now = _thread_ns(me)
        if now - before < idle_fraction * window_s * 1e9:
            break
        before = now
    return time.perf_counter() - start
