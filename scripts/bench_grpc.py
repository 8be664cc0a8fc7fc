"""`serve` against a real Triton Inference Server over HTTP, gRPC and gRPC streaming, with one client for
all: Triton's own perf_analyzer (C++; scripts/perf_analyzer.sh makes it runnable here), so no row
measures a Python client -> benchmarks/serve_grpc_<cpu>.md.

The streaming char LM of scripts/load_test.py (2x256, vocabulary 64), sequences of chunks of 4 tokens
(--sequence-length), at each concurrency; `serve` with --grpc-port, Triton (serving/triton_peer.py,
its sequence batcher and python backend on ONNX Runtime) with its gRPC endpoint. Each server is timed
in its own block (the other idle), in alternating order over the rounds; the table holds medians of
p50 latency and throughput, and the ratios serve / Triton per protocol and serve's gRPC streaming /
serve's HTTP.
"""
import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {"http": ["-i", "http"], "grpc": ["-i", "grpc"], "grpc-stream": ["-i", "grpc", "--streaming"]}


def perf_analyzer() -> str:
    r = subprocess.run([str(ROOT / "scripts" / "perf_analyzer.sh")], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_grpc: perf_analyzer could not be set up: {r.stderr.strip()[-500:]}")
    return r.stdout.strip().splitlines()[-1]


def run(pa: str, model: str, url: str, mode: str, clients: int, data: Path, seconds: float) -> tuple[float, float]:
    """(p50 latency in ms, inferences a second) of one perf_analyzer measurement."""
    cmd = [pa, "-m", model, "-u", url, *MODES[mode], "--input-data", str(data), "--sequence-length", "4",
           "--concurrency-range", str(clients), "--measurement-interval", str(int(seconds * 1000)),
           "--stability-percentage", "25", "--max-trials", "8"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    p50, tput = re.search(r"p50 latency: (\d+) usec", out), re.search(r"Throughput: ([\d.]+) infer/sec", out)
    if r.returncode != 0 or not p50 or not tput:
        raise RuntimeError(f"perf_analyzer {' '.join(cmd[1:])} failed: {out[-800:]}")
    return int(p50.group(1)) / 1000, float(tput.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clients", nargs="*", type=int, default=[1, 8], help="concurrencies (default: 1 8)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over every server (default: 3)")
    ap.add_argument("--seconds", type=float, default=2.0, help="perf_analyzer's measurement window (default: 2)")
    ap.add_argument("--out", default=None, help="report path (default: benchmarks/serve_grpc_<cpu>.md)")
    args = ap.parse_args()
    import torch

    from lstm_export.charlm import CharLM
    from lstm_export.common.machine import cpu_name
    from lstm_export.config import ModelConfig
    from lstm_export.export import export_onnx
    from lstm_export.harness.bench_report import machine_slug
    from lstm_export.serving.loadtest import ServerProcess, free_port
    from lstm_export.serving.triton_peer import TritonServer

    pa = perf_analyzer()
    torch.manual_seed(0)
    samples: dict = {}
    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as stack:
        path = export_onnx(CharLM(ModelConfig(vocab_size=64, embed=64, hidden=256, layers=2)).eval(),
                           Path(d) / "lm.streaming.onnx", "streaming")
        data = Path(d) / "tokens.json"  # valid ids: perf_analyzer's random INT64s are outside the vocabulary
        data.write_text(json.dumps({"data": [{"tokens": {"content": [1, 2, 3, 4], "shape": [4]}}]}))
        grpc_port = free_port()
        serve = stack.enter_context(ServerProcess(path, "--grpc-port", str(grpc_port)))
        triton = stack.enter_context(TritonServer(path, grpc=True))
        urls = {"serve": (serve.port, grpc_port), "triton": (triton.port, triton.grpc_port)}
        for r in range(args.rounds):
            for server in (("serve", "triton") if r % 2 == 0 else ("triton", "serve")):
                for clients in args.clients:
                    for mode in MODES:
                        port = urls[server][0 if mode == "http" else 1]
                        time.sleep(0.5)  # the previous block's threads settle
                        sample = run(pa, "lm.streaming", f"127.0.0.1:{port}", mode, clients, data, args.seconds)
                        samples.setdefault((server, clients, mode), []).append(sample)
                        print(f"round {r + 1} {server} x{clients} {mode}: p50 {sample[0]:.3f} ms, "
                              f"{sample[1]:.0f}/s", flush=True)
    med = {k: (statistics.median(v[0] for v in vs), statistics.median(v[1] for v in vs)) for k, vs in samples.items()}
    lines = [f"# serve vs Triton over HTTP and gRPC ({cpu_name()})", "",
             f"`python scripts/bench_grpc.py {' '.join(map(str, args.clients))} --rounds {args.rounds}`: perf_analyzer "
             "(the same C++ client for every row), char LM 2x256 vocab 64, sequences of 4-token chunks; medians of "
             f"{args.rounds} rounds.", "",
             "| clients | protocol | serve p50 ms | Triton p50 ms | serve / Triton p50 | serve /s | Triton /s "
             "| serve / Triton /s |", "|---|---|---|---|---|---|---|---|"]
    for clients in args.clients:
        for mode in MODES:
            s, t = med[("serve", clients, mode)], med[("triton", clients, mode)]
            lines.append(f"| {clients} | {mode} | {s[0]:.3f} | {t[0]:.3f} | {s[0] / t[0]:.2f} | {s[1]:.0f} | "
                         f"{t[1]:.0f} | {s[1] / t[1]:.2f} |")
    lines.append("")
    for clients in args.clients:
        g, h = med[("serve", clients, "grpc-stream")], med[("serve", clients, "http")]
        lines.append(f"- {clients} client(s): serve's gRPC streaming p50 / its HTTP p50 = {g[0] / h[0]:.2f}")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / f"serve_grpc_{machine_slug(None)}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
