"""A compiled folder's calls in a fresh process against the same calls once warm (issue #49): calls
2..N of a process that has just loaded model.so, then N calls of the same process after 2N more,
through runtimes/deployed.py's worker (TVM's runtime alone, the documented call path); a new
process each round. Both from one process: on the Zen 4 VM a whole process runs one streaming step
at 0.031 or 0.051 ms for seconds at a time (the host's placement), which two processes would
compare instead of fresh against warm."""
from __future__ import annotations

import numpy as np


def calls_for(shape) -> int:
    """N: 1000 calls where a call is well under a millisecond, fewer for the big shapes."""
    return 1000 if shape.T * shape.B <= 64 else 100 if shape.B * shape.H < 64 * 512 else 30


def fresh_vs_warm(shapes, threads: int, rounds: int = 3, progress: bool = True) -> list[dict]:
    """One row per shape: median ms of fresh processes' calls 2..N, of the same processes' N calls
    once warm, their ratio, and the first call."""
    import tempfile
    from pathlib import Path

    from lstm_export.export import export_onnx
    from lstm_export.runtimes.deployed import DeployedArtifact
    from lstm_export.runtimes.source import open_model
    from lstm_export.runtimes.tvm_lstm import cached_compile

    from .bench import _feeds, _model
    from .settle import settle
    rows = []
    with tempfile.TemporaryDirectory(prefix="lstm-export-fresh-") as tmp:
        for shape in shapes:
            if progress:
                print(f"fresh start: {shape.name}", flush=True)
            model, feeds = _model(shape), _feeds(shape)
            graph = export_onnx(model, Path(tmp) / "native.onnx", "native")
            folder = cached_compile(open_model(graph), target="llvm", threads=threads)[0].folder
            n = calls_for(shape)
            fresh_s, warm_s, first = [], [], []
            for _ in range(rounds):
                worker = DeployedArtifact(folder)
                settle()
                # warmup=0: the first call is a sample; calls 2..N are the fresh process's steady state
                samples = worker.time_runs(feeds, warmup=0, min_runs=n, max_runs=n, min_s=0, max_s=600)
                warm_s += worker.time_runs(feeds, warmup=2 * n, min_runs=n, max_runs=n, min_s=0, max_s=600)
                worker.release()
                first.append(samples[0])
                fresh_s += samples[1:]
            f, w = float(np.median(fresh_s)) * 1e3, float(np.median(warm_s)) * 1e3
            rows.append({"shape": shape.name, "calls": n, "fresh_ms": round(f, 4), "warm_ms": round(w, 4),
                         "fresh_vs_warm": round(f / w, 3), "first_call_ms": round(float(np.median(first)) * 1e3, 3)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | calls N | fresh process, calls 2..N ms | the same process warm ms | fresh / warm "
             "| first call ms |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['calls']} | {r['fresh_ms']:.4g} | {r['warm_ms']:.4g} | "
                     f"{r['fresh_vs_warm']:.2f}x | {r['first_call_ms']:.3g} |")
    return "\n".join(lines) + "\n"
