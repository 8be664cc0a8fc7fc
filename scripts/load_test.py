"""Bounded loopback load test of `lstm-export serve` -> benchmarks/serve_load_<cpu>.{json,md}: the /v1 routes
and the Open Inference Protocol's /v2 infer on one process, beside the baseline that runs in the same run:
a bare Starlette endpoint over the same ONNX Runtime session (lstm_export/serving/bare.py, /v2 JSON, one request at a
time); /v2 on 2 Ray Serve replicas (with state tokens) when ray[serve] is installed; and the server's cost
per request against feeding the same stream in-process. `serve` runs with its defaults.
"""
import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clients", nargs="*", type=int, default=[1, 8, 32], help="client counts (default: 1 8 32)")
    ap.add_argument("--chunks", type=int, default=20, help="requests per client (default: 20)")
    ap.add_argument("--out", default=None, help="report prefix (default: benchmarks/serve_load_<cpu> in the repo)")
    args = ap.parse_args()
    if any(n < 1 for n in args.clients) or args.chunks < 1:
        ap.error("client counts and --chunks must be positive")
    import torch

    from lstm_export.charlm import CharLM
    from lstm_export.common.machine import cpu_name
    from lstm_export.config import ModelConfig
    from lstm_export.export import export_onnx
    from lstm_export.harness.bench_report import machine_slug
    from lstm_export.serving.loadtest import ServerProcess, in_process_ms, run_clients, write_report

    counts, chunks = args.clients, args.chunks
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, embed=64, hidden=256, layers=2)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(CharLM(cfg).eval(), Path(d) / "lm.streaming.onnx", "streaming")
        key = Path(d) / "state.key"
        key.write_bytes(b"load-test-state-key-0123456789")
        # each server in its own block, the other stopped: on 2 cores an idle server's threads would
        # still take time from the one measured
        for n in counts:
            with ServerProcess(path, bare=True) as server:
                run_clients(server.url, path, 2, chunks=10, protocol="v2")  # warm-up, not reported
                time.sleep(0.5)
                rows.append(run_clients(server.url, path, n, chunks=chunks, protocol="v2", label="v2 bare"))
            with ServerProcess(path) as server:
                for protocol in ("v1", "v2"):  # warm-up: the first requests pay for lazy set-up
                    run_clients(server.url, path, 2, chunks=10, protocol=protocol)
                time.sleep(0.5)
                rows.append(run_clients(server.url, path, n, chunks=chunks, protocol="v2"))
                rows.append(run_clients(server.url, path, n, chunks=chunks, protocol="v1"))
        if importlib.util.find_spec("ray") is not None:
            with ServerProcess(path, "--replicas", "2", "--state-key-file", str(key),
                               env={"RAY_USAGE_STATS_ENABLED": "0"}) as server:
                run_clients(server.url, path, 2, chunks=10, protocol="v2", replicas=2)  # warm-up
                rows += [run_clients(server.url, path, n, chunks=chunks, protocol="v2", replicas=2) for n in counts]
        alone = in_process_ms(path)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / f"serve_load_{machine_slug()}"
    command = "scripts/load_test.py " + " ".join(str(n) for n in counts) + f" --chunks {chunks}"
    table = write_report(rows, out, cpu_name(), command,
                         "char LM 2x256, vocab 64, streaming graph on ort-cpu; chunks of 8 tokens")
    print(table)
    bare = {r.clients: r for r in rows if r.protocol == "v2 bare"}
    for r in rows:
        if r.protocol == "v2" and r.replicas == 1 and r.clients in bare:
            b = bare[r.clients]
            print(f"{r.clients} client(s): serve /v2 p50 {r.p50_ms / b.p50_ms:.2f}x the bare endpoint's, "
                  f"requests/s {r.requests_per_s / b.requests_per_s:.2f}x")
    one = {r.protocol: r.p50_ms for r in rows if r.clients == 1 and r.replicas == 1}
    print(f"\nin-process feed p50 {alone} ms; one client's p50: "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in one.items()))


if __name__ == "__main__":
    main()
