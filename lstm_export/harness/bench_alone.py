"""Peers timed alone: each peer entry of the bench runs its timed rounds in a fresh process of its
own (FreshPeer), and `bench --check-alone` times it again in other fresh processes, interleaved.

A peer's row must read what a user who runs that peer alone gets. In one process with the other
entries a peer read slower: ONNX Runtime int8 at T64 B64 I256 H512 48 ms against 22 alone (our
artifact's TVM worker kept spinning on half a core), OpenVINO at T50 B128 1.4x (beside the other
runtimes together, not beside any one of them). So the bench's process only checks a peer's output,
and a fresh process per round times it (a whole process on the Zen 4 VM can run a small shape 1.5x
slower than the next for seconds, so one process is a noisy yardstick). The check's alone block runs
right after the same entry's block (after `settle`), so a drift of the VM moves both alike; a row
more than ALONE_TOLERANCE off is reported: the two fresh-process series disagreeing that much says
the bench's numbers for that shape are within the VM's noise, not a peer's speed.
"""
from __future__ import annotations

import pickle
import sys

from lstm_export.runtimes.deployed import PipeWorker

from .settle import settle

ALONE_TOLERANCE = 0.10

_WORKER = r'''
import pickle, struct, sys, tempfile
from pathlib import Path
from lstm_export.harness import bench as B
from lstm_export.common.timing import time_runs
from lstm_export.export import export_onnx
from lstm_export.runtimes.tvm_lstm import pool_threads

label, shape, threads, target = pickle.loads(bytes.fromhex(sys.argv[1]))  # shape: a bench.Shape
rt_name, graph = {l: (r, g) for l, r, g in B.ENTRIES}[label]
model, feeds = B._model(shape), B._feeds(shape)
tmp = tempfile.TemporaryDirectory()
# the native graph is exported for every entry, as the bench's process does for each shape: the
# export frees large blocks, which raises glibc's mmap threshold, and torch.nn.LSTM at one step
# then runs at 0.35-0.56 ms instead of 1.0-2.1 (its per-call buffers stop being mmapped and
# unmapped); the torch entries are timed in that state in the bench, so here too
path = export_onnx(model, Path(tmp.name) / "native.onnx", "native")
if graph != "native":
    kw = {"seq_len": shape.T, "batch_size": shape.B} if graph == "unrolled" else {}
    path = None if graph == "model" else export_onnx(model, Path(tmp.name) / "m.onnx", graph, **kw)


def reply(obj):
    data = pickle.dumps(obj)
    sys.stdout.buffer.write(struct.pack("<Q", len(data)) + data)
    sys.stdout.buffer.flush()


with pool_threads(threads):
    rt = B._runtime(rt_name, model, threads, target, feeds)
    rt.prepare(path)
    rt.run(feeds)
    while True:
        head = sys.stdin.buffer.read(8)
        if len(head) < 8:
            break
        op, arg = pickle.loads(sys.stdin.buffer.read(struct.unpack("<Q", head)[0]))
        reply(("ok", None if op == "ready" else time_runs(lambda: rt.run_checked(feeds), **arg)))
rt.release()
'''


class AloneWorker(PipeWorker):
    """One bench entry on one shape, prepared in a fresh process that times it on request."""

    what = "alone check"

    def __init__(self, label: str, shape, threads: int, target: str | None):
        super().__init__(_WORKER, [pickle.dumps((label, shape, threads, target)).hex()])
        self._ask("ready")  # prepared

    def time_runs(self, **kwargs) -> list[float]:
        return self._ask("time", kwargs)


def off_alone(timings) -> list[str]:
    """One line per row whose median is more than ALONE_TOLERANCE off its alone median."""
    return [f"bench self-check: {t.shape} {t.entry} reads {t.median_ms:.3f} ms here and {t.alone_ms:.3f} ms alone "
            f"in a fresh process ({t.vs_alone:.2f}x)" for t in timings
            if t.vs_alone is not None and abs(t.vs_alone - 1) > ALONE_TOLERANCE]


def time_alone(entry, shape, threads, target, kw, required: bool = False) -> list[float]:
    """One round of `entry` alone: a fresh process each round, so that the alone median spans as many
    processes as rounds (on the Zen 4 VM a whole process can run a small shape 1.5x slower than the
    next, for seconds). Where the worker cannot start: raised if `required` (the row's own timing),
    else empty (the row stands, its check is missing)."""
    try:
        worker = AloneWorker(entry, shape, threads, target)
    except RuntimeError as e:
        if required:
            raise RuntimeError(f"{entry} could not start in a fresh process: {e}") from None
        print(f"bench: no alone check for {entry}: {e}", file=sys.stderr)
        return []
    try:
        settle()
        return worker.time_runs(**dict(kw, warmup=3))
    finally:
        worker.release()


class FreshPeer:
    """A peer entry, timed in a fresh process of its own each round (bench_alone.AloneWorker): in one
    process with the other entries a peer read up to 2.2x slower than alone (ONNX Runtime int8 beside
    our pool's spinning worker; OpenVINO 1.4x beside the other runtimes, not any one of them), and
    a user runs the peer alone. The bench's process checks its output first."""

    def __init__(self, entry: str, shape, threads: int, target: str | None, checked=None):
        self.args = (entry, shape, threads, target)
        if checked is not None:
            checked.release()  # the runtime the bench's process checked: its pools go with it

    def time_runs(self, feeds, **kwargs):  # the worker makes the same feeds again (bench._feeds(shape))
        return time_alone(*self.args, kwargs, required=True)

    def release(self) -> None:
        pass
