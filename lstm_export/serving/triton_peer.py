"""A real NVIDIA Triton Inference Server beside `serve`, for the load test: tritonserver 2.51 as PyPI's
nvidia-pytriton 0.7.0 bundles it, in a venv cached under $TMPDIR/lstm-export-triton (the one
../shared/bench/serve_vs_triton.py makes; either sets it up, the other reuses it).

Triton's onnxruntime backend is not on PyPI, so the model runs in Triton's python backend: model.py
holds one onnxruntime.InferenceSession (ORT's default intra-op threads, as Triton's onnxruntime backend
leaves them, spinning off as `serve` sets it) and keeps (h, c) per correlation id. Triton keeps the
streams with its sequence batcher, strategy `oldest` (requests of different sequences batched
dynamically, up to max_batch_size 8); one execute() runs its requests with the same chunk length as
one ORT batch. Setting up needs the package registry once (a few hundred MB); nothing is fetched
when the cache is there.
"""
from __future__ import annotations

import fcntl
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .loadtest import fetch, free_port, stop_group, wait_ready

CACHE = Path(tempfile.gettempdir()) / "lstm-export-triton"
VENV, ROOT = CACHE / "venv", CACHE / "tritonroot"
PKGS = ["nvidia-pytriton==0.7.0", "onnxruntime", "numpy<2"]

CONFIG = """name: "%(name)s"
backend: "python"
max_batch_size: 8
sequence_batching {
  max_sequence_idle_microseconds: 10000000
  oldest { max_candidate_sequences: 64 max_queue_delay_microseconds: 0 }
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
}
input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ -1, %(vocab)d ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "ort_threads" value: { string_value: "%(threads)d" } }
"""

MODEL_PY = r'''
# Triton python backend: the streaming ONNX graph in one ORT session, (h, c) kept per correlation id.
import json, os
import numpy as np, onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        so = ort.SessionOptions()
        threads = int(cfg["parameters"]["ort_threads"]["string_value"])
        if threads:  # 0: ORT's default, as Triton's onnxruntime backend leaves it
            so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        L, _, H = self.sess.get_inputs()[1].shape
        self.zero = np.zeros((L, 1, H), np.float32)
        self.state = {}

    def _run(self, batch):  # [(index, cid, tokens [1, n], start, end)]: distinct sequences, one n
        hs, cs = [], []
        for _, cid, _, start, _ in batch:
            h, c = (self.zero, self.zero) if start or cid not in self.state else self.state[cid]
            hs.append(h); cs.append(c)
        feeds = {"tokens": np.concatenate([b[2] for b in batch]),
                 "h_0": np.concatenate(hs, axis=1), "c_0": np.concatenate(cs, axis=1)}
        y, hn, cn = self.sess.run(None, feeds)
        for i, (_, cid, _, _, end) in enumerate(batch):
            if end:
                self.state.pop(cid, None)
            else:
                self.state[cid] = (np.ascontiguousarray(hn[:, i:i + 1]), np.ascontiguousarray(cn[:, i:i + 1]))
        return [y[i:i + 1] for i in range(len(batch))]

    def execute(self, requests):
        responses, batch = [None] * len(requests), []

        def flush():
            if batch:
                for b, y in zip(batch, self._run(batch)):
                    responses[b[0]] = pb_utils.InferenceResponse([pb_utils.Tensor("logits", y)])
                batch.clear()

        for j, r in enumerate(requests):
            toks = pb_utils.get_input_tensor_by_name(r, "tokens").as_numpy()
            start = bool(pb_utils.get_input_tensor_by_name(r, "START").as_numpy().ravel()[0])
            end = bool(pb_utils.get_input_tensor_by_name(r, "END").as_numpy().ravel()[0])
            cid = int(pb_utils.get_input_tensor_by_name(r, "CORRID").as_numpy().ravel()[0])
            if batch and (toks.shape[1] != batch[0][2].shape[1] or any(b[1] == cid for b in batch)):
                flush()
            batch.append((j, cid, toks, start, end))
        flush()
        return responses
'''


class SetupError(RuntimeError):
    pass


def _step(cmd: list[str], log: Path, what: str) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=1500)
    if r.returncode:
        raise SetupError(f"{what} failed (exit {r.returncode}); see {log}")


def setup() -> Path:
    """The venv and a tritonserver tree with the python backend stub for its Python, each step skipped
    when done. Returns the venv's site-packages; SetupError says what failed."""
    CACHE.mkdir(parents=True, exist_ok=True)
    log = CACHE / "install.log"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once: the second waits, then finds it done
        py = VENV / "bin" / "python"
        if not os.access(py, os.X_OK):
            shutil.rmtree(VENV, ignore_errors=True)
            _step([shutil.which("python3") or sys.executable, "-m", "venv", str(VENV)], log, "python3 -m venv")
        spec, marker = " ".join(PKGS), CACHE / ".pip-done"
        if not (marker.exists() and marker.read_text() == spec):
            _step([str(py), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *PKGS], log,
                  "pip install " + spec)
            marker.write_text(spec)
            shutil.rmtree(ROOT, ignore_errors=True)
        sps = glob.glob(str(VENV / "lib" / "python3.*" / "site-packages"))
        if len(sps) != 1:
            raise SetupError(f"expected one site-packages in {VENV}, found {len(sps)}")
        sp = Path(sps[0])
        ver = sp.parent.name[len("python"):]
        src = sp / "pytriton" / "tritonserver"
        if not (ROOT / ".done").exists():
            stub = src / "python_backend_stubs" / ver / "triton_python_backend_stub"
            if not stub.exists():
                raise SetupError(f"nvidia-pytriton has no python backend stub for Python {ver}")
            tmp = Path(str(ROOT) + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
            shutil.copy2(stub, tmp / "backends" / "python" / "triton_python_backend_stub")
            (tmp / ".done").write_text(ver)
            os.rename(tmp, ROOT)
    return sp


class TritonServer:
    """tritonserver serving `model_path` (a streaming graph) as `name`, for the with-block."""

    label = "triton"

    def __init__(self, model_path: str | Path, name: str = "lm.streaming", vocab: int = 64, ort_threads: int = 0,
                 grpc: bool = False):
        """grpc: serve Triton's gRPC endpoint too, on grpc_port (else HTTP only)."""
        self.model_path, self.name, self.vocab, self.threads = Path(model_path), name, vocab, ort_threads
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = free_port() if grpc else None

    def __enter__(self):
        sp = setup()
        self.dir = Path(tempfile.mkdtemp(prefix="lstm-export-triton-"))
        mdir = self.dir / "models" / self.name
        (mdir / "1").mkdir(parents=True)
        shutil.copy(self.model_path, mdir / "1" / "model.onnx")
        (mdir / "1" / "model.py").write_text(MODEL_PY)
        (mdir / "config.pbtxt").write_text(CONFIG % {"name": self.name, "vocab": self.vocab, "threads": self.threads})
        env = dict(os.environ, PYTHONPATH=str(sp), PATH=f"{VENV / 'bin'}:{os.environ.get('PATH', '')}",
                   LD_LIBRARY_PATH=":".join(p for p in (str(sp / "nvidia_pytriton.libs"),
                                                        os.environ.get("LD_LIBRARY_PATH")) if p))
        env.pop("PYTHONHOME", None)
        self.log = open(self.dir / "triton.log", "w")
        self.proc = subprocess.Popen(
            [str(ROOT / "bin" / "tritonserver"), f"--model-repository={self.dir / 'models'}",
             f"--backend-directory={ROOT / 'backends'}", f"--cache-directory={ROOT / 'caches'}",
             "--http-address=127.0.0.1", f"--http-port={self.port}",
             *(["--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}"] if self.grpc_port else
               ["--allow-grpc=false"]),
             "--allow-metrics=false", "--allow-sagemaker=false", "--allow-vertex-ai=false", "--log-verbose=0",
             "--log-info=false", "--exit-timeout-secs=5", "--pinned-memory-pool-byte-size=0"],
            env=env, cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        try:
            wait_ready(self.proc, self.url, "tritonserver")
        except RuntimeError as e:
            self.__exit__()
            raise SetupError(f"{e} (log: {self.dir / 'triton.log'})") from None
        return self

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def rows_runs(self) -> tuple[float, float] | None:
        """(requests, execute() calls) so far, from Triton's statistics extension."""
        import json
        try:
            st = json.loads(fetch(self.port, f"/v2/models/{self.name}/stats") or b"{}")["model_stats"][0]
            return float(st["inference_count"]), float(st["execution_count"])
        except (KeyError, ValueError, IndexError):
            return None

    def __exit__(self, *exc):
        stop_group(self.proc)
        self.log.close()
        if not exc or exc[0] is None:
            shutil.rmtree(self.dir, ignore_errors=True)
