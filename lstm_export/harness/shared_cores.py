"""`scripts/bench_shared_cores.py`: a compiled artifact and ONNX Runtime timed while the process shares
its cores, as an application that embeds them does.

Three conditions, each its own block after the process's other threads went quiet (`settle`):
- quiet: back-to-back calls, nothing else running;
- after ORT: every timed call comes right after a run of another ONNX Runtime session in the same
  process, left as users leave it (its threads spin after each run);
- busy thread: back-to-back calls while one other thread of the process computes (C, no GIL).
Blocks are interleaved over `rounds` rounds, so a drift of the VM moves every block alike. The
goal (issue #49): each disturbed median <= 1.2x the quiet one and never slower than ONNX Runtime
under the same disturbance. With one of two cores taken for the whole call no split beats one
thread on the other core, so the table also sets each of ours against that floor: the same
artifact on one task, quiet.
"""
from __future__ import annotations

import ctypes
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lstm_export.common.timing import time_runs

from .settle import settle

CONDITIONS = ("quiet", "after ORT", "busy thread")

_BUSY_SOURCE = r"""
/* one thread's worth of floating-point work until *stop is set; ctypes releases the GIL around it */
double lstm_export_busy(volatile int *stop) {
  double x = 1.0;
  while (!*stop)
    for (int i = 0; i < 20000; ++i) x = x * 1.0000001 + 1e-9;
  return x;
}
"""


class BusyThread:
    """A thread of this process computing for the length of the `with` block."""

    def __init__(self):
        from lstm_export.common.cbuild import CBuildError, cached_library, default_compiler
        from lstm_export.common.errors import UserError
        cc = default_compiler()
        if cc is None:
            raise UserError("the busy-thread condition needs a C compiler (cc or gcc on PATH, or $CC)")
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "busy.c"
            src.write_text(_BUSY_SOURCE)
            try:
                lib = cached_library("bench", "busy", src, cc, ["-shared", "-fPIC", "-O1"])
            except CBuildError as e:
                raise UserError(f"could not build the busy thread: {e}") from None
        self._fn = ctypes.CDLL(str(lib)).lstm_export_busy
        self._fn.argtypes, self._fn.restype = [ctypes.POINTER(ctypes.c_int)], ctypes.c_double
        self._stop = ctypes.c_int(0)
        self._thread = None

    def __enter__(self):
        self._stop.value = 0
        self._thread = threading.Thread(target=self._fn, args=(ctypes.byref(self._stop),), daemon=True)
        self._thread.start()
        time.sleep(0.02)  # running, and placed by the scheduler
        return self

    def __exit__(self, *exc):
        self._stop.value = 1
        self._thread.join()


@dataclass
class Row:
    shape: str
    runtime: str
    ms: dict = field(default_factory=dict)  # condition -> median ms
    vs_quiet: dict = field(default_factory=dict)  # condition -> median / quiet median
    vs_ort: dict = field(default_factory=dict)  # condition -> median / ORT's median in that condition
    # ours: condition -> median / the same artifact's quiet median on one task (the one-core floor)
    vs_floor: dict = field(default_factory=dict)


def measure(shapes, threads: int, rounds: int = 3, min_s: float = 0.3, progress: bool = True) -> list[Row]:
    """Each shape's compiled native graph (tvm-llvm, in-process as users load it; the same artifact on
    thread_pool.c's claiming pool, on TVM's launches and on one task) and ONNX Runtime on the same
    graph, in the three conditions; medians over `rounds` interleaved rounds."""
    busy = BusyThread()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lstm-export-shared-") as tmp:
        for shape in shapes:
            if progress:
                print(f"shared cores: {shape.name}", flush=True)
            rows += _measure_shape(shape, threads, rounds, min_s, busy, Path(tmp))
    return rows


def _measure_shape(shape, threads: int, rounds: int, min_s: float, busy: BusyThread, tmp: Path) -> list[Row]:
    from lstm_export.export import export_onnx
    from lstm_export.runtimes.ort import OrtCpuRuntime
    from lstm_export.runtimes.tvm_lstm import one_task, share_cores
    from lstm_export.runtimes.tvm_runtime import TvmLlvmRuntime

    from .bench import _feeds, _model
    model, feeds = _model(shape), _feeds(shape)
    graph = export_onnx(model, tmp / "native.onnx", "native")
    ours, ort, disturber = TvmLlvmRuntime(threads=threads), OrtCpuRuntime(threads=threads), OrtCpuRuntime()
    for rt in (ours, ort, disturber):
        rt.prepare(graph)
        rt.run(feeds)
    lib = ours.compiled.library
    # (runtime, its call, how the same artifact runs its parallel loops: thread_pool.c's claiming
    # pool, TVM's launches, or one task on the calling thread: the floor of a call beside a busy core)
    runs = {"tvm-llvm native": (lambda: ours.run(feeds), "pool"),
            "tvm-llvm native, TVM's launches": (lambda: ours.run(feeds), "tvm"),
            "tvm-llvm native, one task": (lambda: ours.run(feeds), "one"),
            "ort-cpu native": (lambda: ort.run(feeds), None)}
    samples = {(name, c): [] for name in runs for c in CONDITIONS}
    after_ort = lambda: disturber.run(feeds)  # noqa: E731
    try:
        for _ in range(rounds):
            for name, (fn, mode) in runs.items():
                share_cores(lib, mode != "tvm")
                one_task(lib, mode == "one")
                for cond in CONDITIONS:
                    settle()
                    for _ in range(3):
                        fn()  # warm, as the quiet block is
                    if cond == "busy thread":
                        with busy:
                            samples[name, cond] += time_runs(fn, 0, 10, min_s / rounds, 10**6, 20 * min_s + 5)
                    else:
                        samples[name, cond] += time_runs(fn, 0, 10, min_s / rounds, 10**6, 20 * min_s + 5,
                                                         before=after_ort if cond == "after ORT" else None)
    finally:
        share_cores(lib, True)
        one_task(lib, False)
        for rt in (ours, ort, disturber):
            rt.release()
    med = {k: float(np.median(v)) * 1e3 for k, v in samples.items()}
    rows = []
    for name in runs:
        row = Row(shape.name, name)
        for c in CONDITIONS:
            row.ms[c] = round(med[name, c], 4)
            row.vs_quiet[c] = round(med[name, c] / med[name, "quiet"], 3)
            row.vs_ort[c] = round(med[name, c] / med["ort-cpu native", c], 3)
            if name.startswith("tvm"):
                row.vs_floor[c] = round(med[name, c] / med["tvm-llvm native, one task", "quiet"], 3)
        rows.append(row)
    return rows


def markdown(rows: list[Row], machine: str) -> str:
    """The table docs/cpu_kernel.md shows: ms per condition, each disturbed median against the quiet
    one, against the one-core floor (ours: the same artifact on one task, quiet) and against ONNX
    Runtime in the same condition."""
    disturbed = CONDITIONS[1:]
    head = ["shape", "runtime"] + [f"{c} ms" for c in CONDITIONS] + [f"{c} / quiet" for c in disturbed] + \
        [f"{c} / one-task quiet" for c in disturbed] + [f"vs ORT {c}" for c in CONDITIONS]
    lines = [f"Machine: {machine}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.shape, r.runtime] + [f"{r.ms[c]:.4g}" for c in CONDITIONS] + \
            [f"{r.vs_quiet[c]:.2f}x" for c in disturbed] + \
            [f"{r.vs_floor[c]:.2f}x" if c in r.vs_floor else "" for c in disturbed] + \
            [f"{r.vs_ort[c]:.2f}x" for c in CONDITIONS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def as_json(rows: list[Row], machine: str) -> dict:
    return {"machine": machine, "conditions": list(CONDITIONS), "rows": [asdict(r) for r in rows]}
