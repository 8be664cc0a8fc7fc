"""A bounded load test of `lstm-export serve` on loopback, beside its peers on the same model, bodies and
client: N clients each feed one stream, every stream's outputs are checked against the same stream run
alone on ONNX Runtime, and each server's CPU per request is read from /proc over its own block.

The client is http.client on a keep-alive connection per thread, with every request body built before
the clock starts and the answers decoded after it stops: on 2 cores the client shares the machine with
the server, and a heavy client (httpx spends ~0.3 ms of CPU a request) would measure itself.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lstm_export.common.agreement import output_error

HEADER = "Inference-Header-Content-Length"


@dataclass
class LoadResult:
    server: str  # serve, bare, triton, serve /v1, serve x2 (Ray replicas)
    tensors: str  # json or binary
    clients: int
    requests: int
    errors: int
    mismatches: int  # streams whose outputs differ from the single-stream reference
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_ms: float  # the server's CPU (all its processes) per request, over its block
    rows_per_run: float | None = None  # requests per model run (serve's /metrics, Triton's statistics)


@dataclass
class Workload:
    """Every client's stream: `chunks` chunks of `chunk_len` token ids in [0, vocab_size)."""

    clients: int
    chunks: int
    chunk_len: int = 4
    vocab_size: int = 64
    seed: int = 0

    def streams(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return [rng.integers(0, self.vocab_size, (self.chunks, self.chunk_len)) for _ in range(self.clients)]


def v2_body(tokens: np.ndarray, params: dict, binary: bool) -> tuple[bytes, dict]:
    """One v2 infer request for one stream's chunk (INT64 [1, n]): JSON data, or the binary tensor
    extension (JSON header, then the raw bytes; the output asked for as binary too)."""
    t = {"name": "tokens", "shape": [1, len(tokens)], "datatype": "INT64"}
    if not binary:
        t["data"] = [int(v) for v in tokens]
        return json.dumps({"inputs": [t], "parameters": params}).encode(), {"Content-Type": "application/json"}
    raw = np.ascontiguousarray(tokens, "<i8").tobytes()
    t["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps({"inputs": [t], "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
                       "parameters": params}).encode()
    return head + raw, {"Content-Type": "application/octet-stream", HEADER: str(len(head))}


def v2_logits(headers: dict, data: bytes) -> tuple[np.ndarray, dict]:
    """The first output of a v2 response as float32 [T, V] (its batch axis dropped), and its parameters."""
    n = headers.get(HEADER.lower())
    head = json.loads(data[:int(n)] if n is not None else data)
    out = head["outputs"][0]
    if "data" in out:
        y = np.array(out["data"], np.float32)
    else:
        y = np.frombuffer(data, "<f4", int(np.prod(out["shape"])), int(n))
    return y.reshape(out["shape"])[0], head.get("parameters", {})


def run_clients(port: int, model_path: str | Path, work: Workload, tensors: str = "json", protocol: str = "v2",
                model_name: str = "lm.streaming", label: str = "serve", timeout_s: float = 30.0) -> LoadResult:
    """work.clients threads, one stream each, on /v2 infer as one sequence (with its state token when the
    server signs one) or on /v1's stream routes. The result's server_cpu_ms is left 0: the caller
    measures the server's CPU around this call."""
    streams = work.streams()
    latencies: list[list[float]] = [[] for _ in streams]
    answers: list[list] = [[] for _ in streams]
    errors = [0] * len(streams)
    barrier = threading.Barrier(len(streams) + 1)
    binary = tensors == "binary"
    prebuilt = [[v2_body(s[j], {"sequence_id": 1000 + k, "sequence_start": j == 0,
                                "sequence_end": j == len(s) - 1}, binary) for j in range(len(s))]
                for k, s in enumerate(streams)] if protocol == "v2" else None

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        try:
            sid = None
            if protocol == "v1":
                conn.request("POST", "/v1/streams")
                sid = json.loads(conn.getresponse().read())["stream_id"]
            token = None
            barrier.wait(60)
            for j, chunk in enumerate(streams[k]):
                if protocol == "v1":
                    method_path, (body, headers) = f"/v1/streams/{sid}", (
                        json.dumps({"chunk": chunk.tolist()}).encode(), {"Content-Type": "application/json"})
                else:
                    method_path, (body, headers) = f"/v2/models/{model_name}/infer", prebuilt[k][j]
                    if token is not None:  # a signing server: the state travels with the request
                        params = {"sequence_id": 1000 + k, "sequence_start": False,
                                  "sequence_end": j == len(streams[k]) - 1, "state_token": token}
                        body, headers = v2_body(chunk, params, binary)
                t0 = time.perf_counter()
                conn.request("POST", method_path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                latencies[k].append(time.perf_counter() - t0)
                if r.status != 200:
                    errors[k] += 1
                    continue
                answers[k].append((dict((h.lower(), v) for h, v in r.getheaders()), data))
                if protocol == "v2" and j == 0 and b"state_token" in data[:4096] or token is not None:
                    token = v2_logits(*answers[k][-1])[1].get("state_token")
            if sid:
                conn.request("DELETE", f"/v1/streams/{sid}")
                conn.getresponse().read()
        except (OSError, http.client.HTTPException, threading.BrokenBarrierError, ValueError, KeyError):
            errors[k] += work.chunks - len(answers[k])
            barrier.abort()
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(len(streams))]
    for t in threads:
        t.start()
    try:
        barrier.wait(60)
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout_s * work.chunks)
    seconds = time.perf_counter() - t0
    mismatches = _mismatches(model_path, streams, answers, protocol)
    lat = np.array([x for ls in latencies for x in ls] or [np.nan]) * 1000
    n = sum(len(ls) for ls in latencies)
    return LoadResult(label, tensors, work.clients, n, sum(errors), mismatches, round(seconds, 3),
                      round(n / seconds, 1), round(float(np.percentile(lat, 50)), 3),
                      round(float(np.percentile(lat, 99)), 3), 0.0)


def _mismatches(model_path, streams, answers, protocol) -> int:
    """Streams whose outputs are not the stream run alone, in one call, from a zero state, on ORT."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    L, _, H = sess.get_inputs()[1].shape  # h_0: (layers, batch, hidden)
    z = np.zeros((L, 1, H), np.float32)
    bad = 0
    for s, got in zip(streams, answers):
        ref = sess.run(None, {"tokens": s.reshape(1, -1).astype(np.int64), "h_0": z, "c_0": z})[0][0]
        if len(got) != len(s):
            bad += 1
            continue
        if protocol == "v1":
            ys = [np.array(json.loads(d)["outputs"]["logits"], np.float32) for _, d in got]
        else:
            ys = [v2_logits(h, d)[0] for h, d in got]
        if not output_error("logits", np.concatenate(ys), ref, atol=1e-4, rtol=1e-4).passed:
            bad += 1
    return bad


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def group_cpu(pgid: int) -> float:
    """CPU seconds used so far by the live processes of session `pgid` (a server and its helpers:
    Triton's python backend stub, Ray's workers)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / CLK
    return total


def wait_ready(proc, url: str, what: str, limit_s: float = 120.0) -> None:
    import urllib.request
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not start within {limit_s:.0f} s")


def fetch(port: int, path: str) -> bytes | None:
    """GET path from a server on loopback; None when it does not answer."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", path)
        data = conn.getresponse().read()
        conn.close()
        return data
    except (OSError, http.client.HTTPException):
        return None


class ServerProcess:
    """`lstm-export serve` (or, bare=True, the baseline endpoint of serving/bare.py) in a process of
    its own session on a loopback port, for as long as the with-block lasts. A server of the load
    test has a port, a label, a pgid (its session: every process it starts) and rows_runs()."""

    label = "serve"

    def __init__(self, model_path: str | Path, *flags: str, env: dict | None = None, bare: bool = False,
                 label: str | None = None):
        self.env, self.port = env, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.label = label or ("bare" if bare else "serve")
        command = ["lstm_export.serving.bare"] if bare else ["lstm_export.cli", "serve"]
        self.cmd = [sys.executable, "-m", *command, str(model_path), "--port", str(self.port), *flags]
        self.log = None

    def __enter__(self):
        import tempfile
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=dict(os.environ, **(self.env or {})), start_new_session=True)
        try:
            wait_ready(self.proc, self.url, self.label)
        except RuntimeError as e:
            self.log.seek(0)
            raise RuntimeError(f"{e}: {self.log.read()[-2000:].decode(errors='replace')}") from None
        return self

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def rows_runs(self) -> tuple[float, float] | None:
        """(rows, runs) so far, from /metrics (None from the bare endpoint, which keeps none)."""
        text = fetch(self.port, "/metrics")
        vals = {line.split()[0]: float(line.split()[1]) for line in (text or b"").decode().splitlines()
                if line.startswith("lstm_batch")}
        return (vals["lstm_batched_rows_total"], vals["lstm_batches_total"]) if len(vals) == 2 else None

    def __exit__(self, *exc):
        stop_group(self.proc)
        self.log.close()


def stop_group(proc) -> None:
    """Ends a server started in its own session, and whatever it started (Triton's stub, Ray)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def measure(server, model_path, work: Workload, tensors: str, protocol: str = "v2",
            model_name: str = "lm.streaming") -> LoadResult:
    """One block: the clients against `server`, with its CPU and rows per run over the block."""
    rows0, cpu0 = server.rows_runs(), group_cpu(server.pgid)
    res = run_clients(server.port, model_path, work, tensors, protocol, model_name, server.label)
    cpu1, rows1 = group_cpu(server.pgid), server.rows_runs()
    res.server_cpu_ms = round(1000 * (cpu1 - cpu0) / max(res.requests, 1), 3)
    if rows0 and rows1 and rows1[1] > rows0[1]:
        res.rows_per_run = round((rows1[0] - rows0[0]) / (rows1[1] - rows0[1]), 2)
    return res


def in_process_ms(model_path: str | Path, chunks: int = 300, chunk_len: int = 4, vocab_size: int = 64,
                  seed: int = 0) -> float:
    """p50 ms of one stream's chunk fed to a StreamingSession in this process, with serve's defaults:
    what a request costs without HTTP."""
    from .server import ServerConfig
    from .streaming import StreamingSession
    cfg = ServerConfig()
    rng = np.random.default_rng(seed)
    with StreamingSession(model_path, max_wait_ms=0.0, ort_spinning=cfg.ort_spinning,
                          ort_threads=cfg.ort_threads) as session:
        sid = session.open()
        times = []
        for _ in range(chunks):
            chunk = rng.integers(0, vocab_size, chunk_len)
            t0 = time.perf_counter()
            session.feed(sid, chunk)
            times.append(time.perf_counter() - t0)
    return round(float(np.percentile(np.array(times[10:]) * 1000, 50)), 3)
