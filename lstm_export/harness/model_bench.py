"""Times one model (an .onnx or a compiled folder) on several runtimes: the same checked inputs,
outputs checked equal to the reference's before any timing, medians in interleaved rounds.

The shape bench (bench.py) builds its own LSTMs; this one takes the user's model as it is.
"""
from __future__ import annotations

import numpy as np

from lstm_export.common.agreement import outputs_error
from lstm_export.common.errors import UserError
from lstm_export.common.machine import cpu_name
from lstm_export.common.timing import ratio_to_best, time_runs
from lstm_export.runtimes.base import Runtime, create
from lstm_export.runtimes.source import open_model

from .bench_report import BenchReport, Timing


def bench_model(model, runtimes: list[str | Runtime], feeds: dict[str, np.ndarray], label: str | None = None,
                reference: str | Runtime | None = None, atol: float = 1e-4, rtol: float = 1e-4,
                min_s: float = 1.0, rounds: int = 3, threads: int = 0) -> BenchReport:
    """One row per runtime: median/p90/p99 ms and the ratio to the fastest runtime other than tvm-*.

    A runtime that fails to load or run, or whose outputs differ from the reference's (default:
    the first runtime), is a row with that status and is not timed; the others go on.
    """
    source = open_model(model)
    label = label or f"{source.path.name}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
    rts = [create(r) if isinstance(r, str) else r for r in runtimes]
    if not rts:
        raise UserError("no runtime to bench; name some with --runtimes")
    ref_rt = rts[0] if reference is None else (create(reference) if isinstance(reference, str) else reference)
    if ref_rt not in rts:
        rts.insert(0, ref_rt)
    report = BenchReport(cpu_name(), threads)
    ready: list[tuple[Timing, Runtime, list[float]]] = []
    try:
        ref_rt.prepare(source)
        ref_out = ref_rt.run(feeds)
        for rt in rts:
            t = Timing(rt.name, label)
            try:
                if not rt.prepared:
                    rt.prepare(source)
                errors = outputs_error(rt.run(feeds), ref_out, atol, rtol)
                t.max_err = max((e.max_abs for e in errors), default=0.0)
                if all(e.passed for e in errors):
                    ready.append((t, rt, []))
                else:
                    t.status = "mismatch"
            except UserError as e:
                t.status = f"error: {e}"
            report.timings.append(t)
        for r in range(rounds):
            for _, rt, secs in ready:
                secs.extend(time_runs(lambda rt=rt: rt.run_checked(feeds), warmup=3 if r == 0 else 1,
                                      min_runs=max(1, 10 // rounds), min_s=min_s / rounds, max_s=20.0 / rounds))
    finally:
        for rt in rts:
            rt.release()
    for t, _, secs in ready:
        t.median_ms, t.p90_ms, t.p99_ms = (round(float(np.percentile(secs, q)) * 1e3, 4) for q in (50, 90, 99))
        t.runs = len(secs)
    peers = [t.median_ms for t in report.timings if not t.entry.startswith("tvm")]
    for t in report.timings:
        t.ratio_to_best_peer = ratio_to_best(t.median_ms, peers)
    return report
