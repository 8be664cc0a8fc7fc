"""The bench's self-check (`bench --check-alone`): each peer entry timed alone in a fresh process
with the same settings, interleaved with its rounds in the bench's process.

A peer's row must read what a user who runs that peer alone gets. In one process, another entry's
threads (a pool spinning after its run) can hold a core while the peer is timed: ONNX Runtime int8
at T64 B64 I256 H512 read 48 ms in the bench and 22 ms alone, because our artifact's TVM worker
kept spinning on half a core. Each alone block runs right after the same entry's block here (after
`settle`), so a drift of the VM moves both alike; a row more than ALONE_TOLERANCE off is reported.
"""
from __future__ import annotations

import pickle
import struct
import subprocess
import sys

ALONE_TOLERANCE = 0.10

_WORKER = r'''
import pickle, struct, sys, tempfile
from pathlib import Path
from lstm_export.harness import bench as B
from lstm_export.common.timing import time_runs
from lstm_export.export import export_onnx
from lstm_export.runtimes.tvm_lstm.thread_pool import pool_threads

label, shape, threads, target = pickle.loads(bytes.fromhex(sys.argv[1]))  # shape: a bench.Shape
rt_name, graph = {l: (r, g) for l, r, g in B.ENTRIES}[label]
model, feeds = B._model(shape), B._feeds(shape)
tmp = tempfile.TemporaryDirectory()
path = None
if graph != "model":
    kw = {"seq_len": shape.T, "batch_size": shape.B} if graph == "unrolled" else {}
    path = export_onnx(model, Path(tmp.name) / "m.onnx", graph, **kw)


def reply(obj):
    data = pickle.dumps(obj)
    sys.stdout.buffer.write(struct.pack("<Q", len(data)) + data)
    sys.stdout.buffer.flush()


with pool_threads(threads):
    rt = B._runtime(rt_name, model, threads, target)
    if isinstance(rt, B._Bf16):
        rt.static_shapes = {k: v.shape for k, v in feeds.items()}
    rt.prepare(path)
    rt.run(feeds)
    reply(("ok", None))
    while True:
        head = sys.stdin.buffer.read(8)
        if len(head) < 8:
            break
        kwargs = pickle.loads(sys.stdin.buffer.read(struct.unpack("<Q", head)[0]))
        reply(("ok", time_runs(lambda: rt.run_checked(feeds), **kwargs)))
rt.release()
'''


class AloneWorker:
    """One bench entry on one shape, prepared in a fresh process that times it on request."""

    def __init__(self, label: str, shape, threads: int, target: str | None):
        arg = pickle.dumps((label, shape, threads, target)).hex()
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, arg], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._read()  # prepared

    def _read(self):
        head = self.proc.stdout.read(8)
        if len(head) < 8:
            err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"the alone worker ended: {err[-1] if err else 'no message'}")
        return pickle.loads(self.proc.stdout.read(struct.unpack("<Q", head)[0]))[1]

    def time_runs(self, **kwargs) -> list[float]:
        data = pickle.dumps(kwargs)
        self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
        self.proc.stdin.flush()
        return self._read()

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def off_alone(timings) -> list[str]:
    """One line per row whose median is more than ALONE_TOLERANCE off its alone median."""
    return [f"bench self-check: {t.shape} {t.entry} reads {t.median_ms:.3f} ms here and {t.alone_ms:.3f} ms alone "
            f"in a fresh process ({t.vs_alone:.2f}x)" for t in timings
            if t.vs_alone is not None and abs(t.vs_alone - 1) > ALONE_TOLERANCE]
