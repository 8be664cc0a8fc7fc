"""A bounded load test of `lstm-export serve` on loopback: N clients feed interleaved streams and every
stream's outputs are checked against the same stream run alone, in one call, on ONNX Runtime."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lstm_export.common.agreement import output_error


@dataclass
class LoadResult:
    protocol: str
    replicas: int
    clients: int
    requests: int
    errors: int
    mismatches: int  # streams whose outputs differ from the single-stream reference
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float


def reference_logits(sess, ids: np.ndarray) -> np.ndarray:
    """One stream alone, in one call, from a zero state, on an ONNX Runtime session."""
    shape = sess.get_inputs()[1].shape  # h_0: (layers, batch, hidden)
    z = np.zeros((shape[0], 1, shape[2]), np.float32)
    return sess.run(None, {"tokens": ids[None, :].astype(np.int64), "h_0": z, "c_0": z})[0][0]


def run_clients(base_url: str, model_path: str | Path, clients: int, chunks: int = 20, chunk_len: int = 8,
                vocab_size: int = 64, seed: int = 0, timeout_s: float = 30.0, protocol: str = "v1",
                model_name: str = "lm.streaming", replicas: int = 1, label: str | None = None) -> LoadResult:
    """Each client opens a stream and sends `chunks` chunks of `chunk_len` random token ids: on /v1,
    or on the Open Inference Protocol's /v2 infer as one sequence (carrying its state token when
    the server signs one)."""
    import httpx
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, vocab_size, chunks * chunk_len) for _ in range(clients)]
    latencies: list[float] = []
    errors = [0]
    outputs: dict[int, list] = {}
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(k: int) -> None:
        with httpx.Client(base_url=base_url, timeout=timeout_s) as c:
            sid = c.post("/v1/streams").json()["stream_id"] if protocol == "v1" else None
            start.wait()
            got, token = [], None
            for j in range(chunks):
                chunk = seqs[k][j * chunk_len:(j + 1) * chunk_len].tolist()
                t0 = time.perf_counter()
                if protocol == "v1":
                    r = c.post(f"/v1/streams/{sid}", json={"chunk": chunk})
                else:
                    params = {"sequence_id": f"load-{k}", "sequence_start": j == 0, "sequence_end": j == chunks - 1}
                    if token:
                        params["state_token"] = token
                    r = c.post(f"/v2/models/{model_name}/infer", json={"inputs": [
                        {"name": "tokens", "shape": [1, len(chunk)], "datatype": "INT64", "data": chunk}],
                        "parameters": params})
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if r.status_code != 200:
                        errors[0] += 1
                        continue
                if protocol == "v1":
                    got.append(np.array(r.json()["outputs"]["logits"], np.float32))
                else:
                    out = r.json()
                    token = out.get("parameters", {}).get("state_token")
                    got.append(np.array(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"])[0])
            if sid:
                c.delete(f"/v1/streams/{sid}")
            outputs[k] = got

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    import onnxruntime as ort
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    mismatches = 0
    for k in range(clients):
        got = outputs.get(k, [])
        ref = reference_logits(sess, seqs[k])
        if len(got) != chunks or not output_error("logits", np.concatenate(got), ref, atol=1e-4, rtol=1e-4).passed:
            mismatches += 1
    lat = np.array(latencies) * 1000
    n = clients * chunks
    return LoadResult(label or protocol, replicas, clients, n, errors[0], mismatches, round(seconds, 3),
                      round(n / seconds, 1),
                      round(float(np.percentile(lat, 50)), 2), round(float(np.percentile(lat, 99)), 2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`lstm-export serve` in its own process on a loopback port, for as long as the with-block lasts."""

    def __init__(self, model_path: str | Path, *flags: str, env: dict | None = None, bare: bool = False):
        """bare: the baseline endpoint (lstm_export/serving/bare.py) over the same model instead of `serve`."""
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = ["lstm_export.serving.bare"] if bare else ["lstm_export.cli", "serve"]
        self.cmd = [sys.executable, "-m", *command, str(model_path), "--port", str(self.port), *flags]

    def __enter__(self):
        import os

        import httpx
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, **(self.env or {})))
        deadline = time.time() + 120  # a Ray deployment starts in tens of seconds
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not start within 120 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def write_report(rows: list[LoadResult], prefix: str | Path, machine: str, command: str, model: str) -> str:
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps({"machine": machine, "command": command, "model": model,
                                                       "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    lines = ["| route | replicas | clients | requests | errors | crossed/mismatched streams | requests/s | p50 ms | "
             "p99 ms |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.protocol} | {r.replicas} | {r.clients} | {r.requests} | {r.errors} | {r.mismatches} | "
              f"{r.requests_per_s} | {r.p50_ms} | {r.p99_ms} |" for r in rows]
    table = "\n".join(lines)
    prefix.with_suffix(".md").write_text(f"Serving load test on loopback\n\nMachine: {machine}. Model: {model}. "
                                         f"Command: `{command}`.\n\n{table}\n")
    return table


def in_process_ms(model_path: str | Path, chunks: int = 200, chunk_len: int = 8, vocab_size: int = 64,
                  seed: int = 0) -> float:
    """p50 ms of one stream's chunk fed to a StreamingSession in this process: the server's cost per
    request is its p50 with one client minus this."""
    from .streaming import StreamingSession
    rng = np.random.default_rng(seed)
    with StreamingSession(model_path, max_wait_ms=0.0) as session:
        sid = session.open()
        times = []
        for _ in range(chunks):
            chunk = rng.integers(0, vocab_size, chunk_len)
            t0 = time.perf_counter()
            session.feed(sid, chunk)
            times.append(time.perf_counter() - t0)
    return round(float(np.percentile(np.array(times[10:]) * 1000, 50)), 3)
