"""Bounded loopback load test of `lstm-export serve` -> benchmarks/serve_load_<cpu>.{json,md}: the /v1 routes
and the Open Inference Protocol's /v2 infer on one process, and /v2 on 2 Ray Serve replicas (with
state tokens) when ray[serve] is installed; and the server's cost per request against feeding the
same stream in-process.

Usage: .venv/bin/python scripts/load_test.py [CLIENT_COUNTS...]   (default 1 2 4 8 16)
"""
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

from common.machine import cpu_name
from harness.bench_report import machine_slug
from lstm_export.charlm import CharLM
from lstm_export.config import ModelConfig
from lstm_export.export import export_onnx
from serving.loadtest import ServerProcess, in_process_ms, run_clients, write_report

if __name__ == "__main__":
    counts = [int(a) for a in sys.argv[1:]] or [1, 2, 4, 8, 16]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, embed=64, hidden=256, layers=2)
    flags = ("--max-batch", "16", "--max-wait-ms", "2")
    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(CharLM(cfg).eval(), Path(d) / "lm.streaming.onnx", "streaming")
        key = Path(d) / "state.key"
        key.write_bytes(b"load-test-state-key-0123456789")
        with ServerProcess(path, *flags) as server:
            for protocol in ("v1", "v2"):  # warm-up, not reported: the first requests pay for lazy set-up
                run_clients(server.url, path, 2, chunks=10, chunk_len=8, protocol=protocol)
            rows = [run_clients(server.url, path, n, chunks=20, chunk_len=8) for n in counts]
            rows += [run_clients(server.url, path, n, chunks=20, chunk_len=8, protocol="v2") for n in counts]
        if importlib.util.find_spec("ray") is not None:
            with ServerProcess(path, *flags, "--replicas", "2", "--state-key-file", str(key),
                               env={"RAY_USAGE_STATS_ENABLED": "0"}) as server:
                run_clients(server.url, path, 2, chunks=10, chunk_len=8, protocol="v2", replicas=2)  # warm-up
                rows += [run_clients(server.url, path, n, chunks=20, chunk_len=8, protocol="v2", replicas=2)
                         for n in counts]
        alone = in_process_ms(path)
    table = write_report(rows, f"benchmarks/serve_load_{machine_slug()}", cpu_name(),
                         ".venv/bin/python scripts/load_test.py " + " ".join(sys.argv[1:]),
                         "char LM 2x256, vocab 64, streaming graph on ort-cpu; chunks of 8 tokens, 20 per client")
    one = {r.protocol: r.p50_ms for r in rows if r.clients == 1 and r.replicas == 1}
    print(table)
    print(f"\nin-process feed p50 {alone} ms; the server adds "
          + ", ".join(f"{v - alone:.2f} ms on {k}" for k, v in one.items()) + " per request (p50, one client)")
