"""Bounded loopback load test of `lstm-export serve` against its peers -> benchmarks/serve_load_<cpu>.{json,md,png}.

The same streaming char LM (2x256, vocabulary 64), the same v2 bodies (chunks of 4 token ids, Triton's
sequence parameters, JSON and binary tensors) and the same client (lstm_export/serving/loadtest.py) for:
`serve` with its defaults; the bare endpoint, a Starlette app running the same ONNX Runtime session inline
(lstm_export/serving/bare.py); a real Triton Inference Server (serving/triton_peer.py) when its venv can
be set up; `serve`'s /v1 stream routes; 2 Ray Serve replicas when ray[serve] is installed. Each server
runs in its own process and is measured in its own block (the others idle), in alternating order over
the rounds; the table holds medians. Every stream's outputs are checked against the stream run alone.
"""
import argparse
import contextlib
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clients", nargs="*", type=int, default=[1, 8, 32], help="client counts (default: 1 8 32)")
    ap.add_argument("--requests", type=int, default=800, help="requests a block, over its clients (default: 800)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over every server and count (default: 3)")
    ap.add_argument("--triton", choices=("auto", "on", "off"), default="auto",
                    help="the Triton row: auto sets up its cached venv when it can and skips it when not "
                         "(default: auto); on fails without it")
    ap.add_argument("--triton-ort-threads", type=int, default=0,
                    help="ONNX Runtime intra-op threads in Triton's model (default 0: ORT's own default, as "
                         "Triton's onnxruntime backend leaves it)")
    ap.add_argument("--out", default=None, help="report prefix (default: benchmarks/serve_load_<cpu> in the repo)")
    args = ap.parse_args()
    if any(n < 1 for n in args.clients) or args.requests < 1 or args.rounds < 1 or args.triton_ort_threads < 0:
        ap.error("client counts, --requests and --rounds must be positive")
    import torch

    from lstm_export.charlm import CharLM
    from lstm_export.common.machine import cpu_name
    from lstm_export.config import ModelConfig
    from lstm_export.export import export_onnx
    from lstm_export.harness.bench_report import machine_slug
    from lstm_export.serving.load_report import LoadReport
    from lstm_export.serving.loadtest import ServerProcess, Workload, in_process_ms, measure

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, embed=64, hidden=256, layers=2)
    command = "scripts/load_test.py " + " ".join(map(str, args.clients)) + f" --requests {args.requests} " \
              f"--rounds {args.rounds}" + (f" --triton-ort-threads {args.triton_ort_threads}"
                                           if args.triton_ort_threads else "")
    report = LoadReport(cpu_name(), command, "char LM 2x256, vocab 64, streaming graph on ONNX Runtime; "
                                             "v2 sequences of chunks of 4 tokens")
    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as stack:
        path = export_onnx(CharLM(cfg).eval(), Path(d) / "lm.streaming.onnx", "streaming")
        servers = [stack.enter_context(ServerProcess(path)), stack.enter_context(ServerProcess(path, bare=True))]
        if args.triton != "off":
            from lstm_export.serving.triton_peer import SetupError, TritonServer
            t0 = time.monotonic()
            try:
                servers.append(stack.enter_context(TritonServer(path, ort_threads=args.triton_ort_threads)))
                print(f"triton: ready in {time.monotonic() - t0:.0f} s", flush=True)
            except (SetupError, OSError) as e:
                if args.triton == "on":
                    print(f"load test: Triton could not be set up: {e}", file=sys.stderr)
                    return 2
                print(f"triton: skipped ({e})", flush=True)
        for s in servers:  # warm-up, not reported: the first requests pay for lazy set-up
            for tensors in ("json", "binary"):
                measure(s, path, Workload(2, 20), tensors)
        for r in range(args.rounds):
            blocks = []
            for n in args.clients:
                work = Workload(n, max(20, args.requests // n), seed=100 * r + n)
                for s in (servers if r % 2 == 0 else servers[::-1]):
                    for tensors in ("json", "binary"):
                        time.sleep(0.3)  # a pause between blocks: nothing of the last one still runs
                        blocks.append(measure(s, path, work, tensors))
                        print(f"round {r + 1}/{args.rounds}: {_line(blocks[-1])}", flush=True)
                time.sleep(0.3)
                blocks.append(measure(servers[0], path, work, "json", protocol="v1"))
                blocks[-1].server = "serve /v1"
                print(f"round {r + 1}/{args.rounds}: {_line(blocks[-1])}", flush=True)
            report.rounds.append(blocks)
        stack.close()  # every server stopped: the Ray replicas and the in-process run get the cores
        if importlib.util.find_spec("ray") is not None:
            _ray_rows(report, path, args, Path(d))
        alone = in_process_ms(path)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / f"serve_load_{machine_slug()}"
    report.write(out)
    print(report.table())
    print("\n".join(g.line() for g in report.goals()))
    print(f"in-process feed of one chunk (StreamingSession, serve's defaults): p50 {alone} ms; "
          f"written {out}.{{json,md,png}}")
    return 0


def _line(r) -> str:
    rows = "" if r.rows_per_run is None else f", {r.rows_per_run} rows/run"
    return (f"{r.server} {r.tensors} x{r.clients}: {r.requests_per_s:.0f} req/s, p50 {r.p50_ms:.2f} ms, "
            f"p99 {r.p99_ms:.2f} ms, server CPU {r.server_cpu_ms:.2f} ms/req{rows}"
            + (f", {r.errors} errors" if r.errors else "") + (f", {r.mismatches} MISMATCHED" if r.mismatches else ""))


def _ray_rows(report, path, args, tmp: Path) -> None:
    from lstm_export.serving.loadtest import ServerProcess, Workload, measure
    key = tmp / "state.key"
    key.write_bytes(b"load-test-state-key-0123456789")
    with ServerProcess(path, "--replicas", "2", "--state-key-file", str(key), env={"RAY_USAGE_STATS_ENABLED": "0"},
                       label="serve x2 (Ray)") as server:
        measure(server, path, Workload(2, 10), "json")  # warm-up
        for n in args.clients:  # one block a count, in the first round (its row's median is that block)
            report.rounds[0].append(measure(server, path, Workload(n, max(20, args.requests // n)), "json"))


if __name__ == "__main__":
    sys.exit(main())
