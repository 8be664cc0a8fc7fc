"""A compiled artifact as a user deploys it: loaded in a fresh process with TVM's runtime alone.

The worker process gets this process's environment without TVM_NUM_THREADS and OMP_NUM_THREADS
and with TVM_USE_RUNTIME_LIB=1 (no compiler library), loads DIR/model.so with
`tvm.runtime.load_module` + `VirtualMachine` exactly as the README shows, and times
`numpy in -> a staging tensor kept per input (one copy) -> main -> np.from_dlpack` itself, so
that no pipe sits inside a timing.
The bench interleaves its rounds with the in-process runtimes', so the ratios compare one run.
"""
from __future__ import annotations

import inspect
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from lstm_export.common.timing import time_runs

WORKER = r'''
import json, pickle, struct, sys, time
import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

art = sys.argv[1]
# read as a deployment reads it, without our package: the two keys source.ArtifactMeta writes as
# lists of {"name", ...}, in main's argument and result order
meta = json.load(open(art + "/meta.json"))
names = [i["name"] for i in meta["inputs"]]
vm = VirtualMachine(tvm.runtime.load_module(art + "/model.so"), tvm.cpu())
main = vm["main"]


staging = {}


def tensor(name, a):
    # docs/compile.md's way: each input copied into a tensor kept per input and shape (7 us at one
    # streaming step; a new tvm.runtime.tensor per call took 34 us, as long as the step itself)
    key = (name, a.shape, a.dtype.str)
    if key not in staging:
        t = tvm.runtime.empty(a.shape, str(a.dtype), tvm.cpu())
        try:
            view = np.from_dlpack(t)
        except (BufferError, TypeError, RuntimeError):  # a dtype DLPack cannot carry to NumPy
            view = None
        staging[key] = (t, view)
    t, view = staging[key]
    if view is None:
        t.copyfrom(np.ascontiguousarray(a))
    else:
        np.copyto(view, a)
    return t


def call(feeds):
    out = main(*[tensor(n, feeds[n]) for n in names])
    outs = [out] if hasattr(out, "numpy") else list(out)
    return [np.from_dlpack(o) for o in outs]  # results the call allocated, shared without a copy


def reply(obj):
    data = pickle.dumps(obj)
    sys.stdout.buffer.write(struct.pack("<Q", len(data)) + data)
    sys.stdout.buffer.flush()


while True:
    head = sys.stdin.buffer.read(8)
    if len(head) < 8:
        break
    op, arg = pickle.loads(sys.stdin.buffer.read(struct.unpack("<Q", head)[0]))
    try:
        if op == "run":
            outs = call(arg)
            reply(("ok", {o["name"]: v for o, v in zip(meta["outputs"], outs)}))
        elif op == "time":
            feeds, warmup, min_runs, min_s, max_runs, max_s = arg
            reply(("ok", time_runs(lambda: call(feeds), warmup, min_runs, min_s, max_runs, max_s)))
        elif op == "threads":
            reply(("ok", int(tvm.get_global_func("runtime.NumThreads")())))
    except Exception as e:  # reported to the parent as one line (this worker imports TVM alone, not lstm_export)
        reply(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
'''


class PipeWorker:
    """A Python process that answers (op, arg) requests on stdin with ("ok" | "error", value) on
    stdout, each message pickled behind its 8-byte length; `what` names it in errors."""

    what = "worker"

    def __init__(self, code: str, args: list[str], env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    def _ask(self, op, arg=None):
        data = pickle.dumps((op, arg))
        try:
            self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
            self.proc.stdin.flush()
            head = self.proc.stdout.read(8)
        except BrokenPipeError:
            head = b""
        if len(head) < 8:
            err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"the {self.what}'s process ended: {err[-1] if err else 'no message'}")
        status, value = pickle.loads(self.proc.stdout.read(struct.unpack("<Q", head)[0]))
        if status != "ok":
            raise RuntimeError(value)
        return value

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class DeployedArtifact(PipeWorker):
    """A compiled folder (model.so + meta.json) served by a fresh worker process (see above)."""

    what = "deployed artifact"

    def __init__(self, artifact_dir: str | Path):
        env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
        env["TVM_USE_RUNTIME_LIB"] = "1"
        # the worker imports nothing of ours (a user's deployment would not): the timing loop
        # travels as source
        super().__init__(inspect.getsource(time_runs) + WORKER, [str(artifact_dir)], env)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._ask("run", feeds)

    def time_runs(self, feeds, warmup=3, min_runs=10, min_s=1.0, max_runs=500, max_s=20.0) -> list[float]:
        """Seconds per call, timed inside the worker by common.timing.time_runs."""
        return self._ask("time", (feeds, warmup, min_runs, min_s, max_runs, max_s))

    def threads(self) -> int:
        """The worker's TVM thread-pool size, as the artifact set it."""
        return self._ask("threads")
