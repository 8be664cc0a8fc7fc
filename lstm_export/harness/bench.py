"""`lstm-export bench`: every runtime on the same LSTM shapes, outputs checked equal before timing.

Each entry is a runtime on a graph (native or unrolled ONNX, or a torch model). For each shape:
outputs are compared with torch.nn.LSTM first (a fast wrong answer is a failure, not a timing),
then warm-up, then repeated runs until at least `min_runs` and `min_s` seconds; median, p90, p99,
GFLOP/s, and the ratio of the median to the best peer's median measured in the same run.
Every entry of a shape is prepared first and then timed in `rounds` interleaved rounds (A B C A B C
...), so that a slow drift of the machine (another tenant, the clock) moves every entry's samples
alike instead of landing on whichever entry ran at the time. A peer's output is checked here and
its rounds are timed in a fresh process of its own each (bench_alone.FreshPeer), as users run it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lstm_export.common.agreement import output_error, tolerance_for
from lstm_export.common.errors import UserError, describe
from lstm_export.common.timing import ratio_to_best

from .bench_alone import FreshPeer, time_alone
from .bench_report import (  # noqa: F401 (plot, PEERS: the bench's API)
    PEERS,
    REDUCED_PEERS,
    BenchReport,
    Timing,
    plot,
)
from .settle import settle

# (label, runtime, graph): graph is "native", "unrolled" or "model" (a torch runtime on our model)
ENTRIES = [
    ("torch (ours)", "torch", "model"),
    ("torch.nn.LSTM", "torch-nn", "model"),
    ("torch.compile (ours)", "torch-compile", "model"),
    ("ort-cpu native", "ort-cpu", "native"),
    ("ort-cpu unrolled", "ort-cpu", "unrolled"),
    ("openvino native", "openvino", "native"),
    ("tvm-llvm native", "tvm-llvm", "native"),
    # the compiled artifact loaded in a fresh process with TVM's runtime alone and no environment
    # variables (lstm_export/runtimes/deployed.py): what a user who deploys model.so gets
    ("tvm-llvm native (deployed)", "tvm-deployed", "native"),
    ("tvm-llvm unrolled", "tvm-llvm", "unrolled"),
    # reduced precision, each row's error against fp32 in max_err: ours (compile --precision bf16 or
    # int8, for the shape's static shapes so that compile times each layer's engines, where the CPU
    # has the instructions) against the peers' reduced-precision paths as users get them
    ("tvm-llvm native bf16", "tvm-bf16", "native"),
    ("tvm-llvm native int8", "tvm-int8", "native"),
    ("openvino native (default)", "openvino-default", "native"),
    ("ort-cpu native int8", "ort-cpu-int8", "native"),
]
GPU_ENTRIES = [("torch.nn.LSTM cuda", "torch-nn-cuda", "model"), ("ort-cuda native", "ort-cuda", "native"),
               ("tvm-cuda native", "tvm-cuda", "native")]


@dataclass(frozen=True)
class Shape:
    """T steps, batch B, input size I, hidden H, layers; `lm` times the char LM (I = vocabulary)."""

    T: int
    B: int
    I: int
    H: int
    layers: int = 1
    lm: bool = False

    @property
    def name(self) -> str:
        return (f"charLM T{self.T} B{self.B} V{self.I} H{self.H} L{self.layers}" if self.lm
                else f"T{self.T} B{self.B} I{self.I} H{self.H} L{self.layers}")

    def flops(self) -> float:
        """Multiply-adds x 2 of the gate GEMMs plus ~10 flops per unit per step for the cell."""
        total = 0.0
        for layer in range(self.layers):
            i = (64 if self.lm else self.I) if layer == 0 else self.H
            total += self.T * self.B * (2 * 4 * self.H * (i + self.H) + 10 * self.H)
        if self.lm:
            total += self.T * self.B * 2 * self.H * self.I
        return total

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """'T,B,I,H[,layers]'."""
        try:
            parts = [int(p) for p in text.split(",")]
        except ValueError:
            parts = []
        if len(parts) not in (4, 5) or min(parts) < 1 or max(parts) > 1_000_000:
            raise UserError(f"--shape expects T,B,I,H[,layers]: 4 or 5 integers from 1 to 1000000, got {text!r}")
        return cls(*parts)


DEFAULT_SHAPES = [Shape(50, 128, 20, 100), Shape(32, 1, 128, 256), Shape(64, 64, 256, 512), Shape(1, 1, 256, 256, 2),
                  Shape(256, 1, 65, 512, 2, lm=True)]


def _model(shape: Shape):
    import torch

    from lstm_export import LSTM
    from lstm_export.charlm import CharLM
    from lstm_export.config import ModelConfig
    torch.manual_seed(0)
    if shape.lm:
        return CharLM(ModelConfig(vocab_size=shape.I, embed=64, hidden=shape.H, layers=shape.layers)).eval()
    return LSTM(shape.I, shape.H, shape.layers).eval()


def _feeds(shape: Shape) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if shape.lm:
        return {"tokens": rng.integers(0, shape.I, (shape.B, shape.T)).astype(np.int64)}
    return {"input": rng.standard_normal((shape.T, shape.B, shape.I)).astype(np.float32)}


def _runtime(name: str, model, threads: int, target: str | None = None, feeds: dict | None = None):
    """The entry's runtime, made by the one factory; one unavailable here raises _Unavailable.
    tvm-bf16 and tvm-int8 compile for the feeds' shapes, as the bench's other compiled rows run."""
    from lstm_export.runtimes.base import RuntimeOptions, create, runtime_class
    if name == "torch-compile":
        from lstm_export.runtimes.torch_runtime import TorchCompileRuntime
        return TorchCompileRuntime(model=model, threads=threads)
    if name == "torch-nn-cuda":
        return create("torch-nn", RuntimeOptions(model=model, device="cuda"))
    avail = runtime_class(name).availability()
    if not avail:
        raise _Unavailable(avail.reason)
    shapes = {k: v.shape for k, v in feeds.items()} if feeds is not None else None
    return create(name, RuntimeOptions(threads=threads, target=target, model=model, static_shapes=shapes))


class _Unavailable(Exception):
    pass


def _is_peer(entry: str) -> bool:
    return entry in PEERS + REDUCED_PEERS


@contextlib.contextmanager
def _recorded(t: Timing):
    """Runs the block; a failure becomes t's status (one broken entry must not lose the others' numbers)."""
    try:
        yield
    except _Unavailable as e:
        t.status = f"unavailable: {e}"
    except UserError as e:
        t.status = f"error: {e}"
    except Exception as e:
        t.status = f"error: {describe(e, 120)}"


def machine_description(threads: int, target: str | None = None) -> dict:
    """Where the bench runs: this CPU's ISA and caches, the target our kernel is built for, and the
    FP32 FMA peak measured now on `threads` cores (this machine's widest ISA, and our kernel's)."""
    from lstm_export.runtimes.tvm_lstm import cpu_info, host_target, parse_target

    from .fma_peak import fma_peak
    host = host_target(threads)
    built = parse_target(target or "llvm", threads)
    info, kinfo = cpu_info(host), cpu_info(built)
    peak = fma_peak(host, threads)
    kpeak = peak if kinfo.isa == info.isa else fma_peak(built, threads)
    return {"machine_isa": info.isa, "kernel_isa": kinfo.isa, "target": target or "llvm", "cores": info.cores,
            "l1d_kb": info.l1d // 1024, "l2_kb": info.l2 // 1024, "l3_mb": info.l3 // (1024 * 1024),
            "cache_source": info.cache_source, "fma_peak_gflops": peak.gflops, "kernel_peak_gflops": kpeak.gflops}


def bench(shapes=None, entries=None, threads: int | None = None, atol: float = 1e-4, min_s: float = 1.0,
          rounds: int = 3, progress: bool = True, target: str | None = None, describe_machine: bool = True,
          check_alone: bool = False) -> BenchReport:
    """Benchmarks `entries` (labels from ENTRIES) on `shapes`, each timed for `min_s` seconds in all,
    split over `rounds` interleaved rounds; see the module docstring. `target` builds the tvm-llvm
    entries for another TVM target (e.g. `llvm -mcpu=haswell` for the AVX2 kernel on an AVX-512
    machine); `describe_machine` measures the FMA peak for the % of peak column; `check_alone` times
    each peer entry alone in a fresh process too (bench_alone.py), each row's `alone_ms`."""

    from lstm_export.common.machine import cpu_name
    from lstm_export.runtimes.tvm_lstm import usable_cores
    threads = threads or usable_cores()
    shapes = shapes or DEFAULT_SHAPES
    table = {label: (rt, graph) for label, rt, graph in ENTRIES + GPU_ENTRIES}
    labels = entries or [label for label, _, _ in ENTRIES]
    unknown = [e for e in labels if e not in table]
    if unknown:
        raise UserError(f"unknown bench entries {unknown}; choose from {list(table)}")
    if rounds < 1:
        raise UserError(f"--rounds {rounds} must be at least 1")
    report = BenchReport(cpu_name(), threads)
    from lstm_export.runtimes.tvm_lstm import pool_threads
    with pool_threads(threads):  # TVM's pool starts during the bench, sized for `threads`
        _bench(report, shapes, labels, table, threads, atol, min_s, rounds, progress, target, describe_machine,
               check_alone)
    return report


def _bench(report, shapes, labels, table, threads, atol, min_s, rounds, progress, target, describe_machine,
           check_alone) -> None:
    from tqdm import tqdm

    from lstm_export.export import export_onnx
    tvm_ok = any(table[e][0].startswith("tvm") for e in labels)
    if describe_machine and tvm_ok and importlib.util.find_spec("tvm") is not None:
        report.cpu = machine_description(threads, target)
    jobs = [(s, e) for s in shapes for e in labels]
    # a bar on a terminal; otherwise (a log, CI) one line per shape
    tty = sys.stderr.isatty()
    bar = tqdm(total=len(jobs) * (1 + rounds), disable=not (progress and tty), desc="bench", unit="step")
    with tempfile.TemporaryDirectory(prefix="lstm-export-bench-") as tmp:
        for n_shape, shape in enumerate(shapes):
            if progress and not tty:
                print(f"bench: shape {n_shape + 1}/{len(shapes)}: {shape.name}", file=sys.stderr, flush=True)
            model, feeds = _model(shape), _feeds(shape)
            graphs = {"native": export_onnx(model, Path(tmp) / f"{shape.name}.native.onnx".replace(" ", "_"), "native"),
                      "unrolled": export_onnx(model, Path(tmp) / f"{shape.name}.unrolled.onnx".replace(" ", "_"),
                                              "unrolled", seq_len=shape.T, batch_size=shape.B)}
            reference = _run_once("torch-nn", model, threads, None, feeds)
            first = next(iter(reference))
            done, ready = [], []  # every entry's Timing; those checked equal, with their runtime
            for label in labels:
                rt_name, graph = table[label]
                bar.set_postfix_str(f"{shape.name}: {label}")
                t = Timing(label, shape.name)
                with _recorded(t):
                    rt = _runtime(rt_name, model, threads, target, feeds)
                    rt.prepare(graphs.get(graph))
                    out = rt.run(feeds)
                    # a reduced-precision row is held to its format's tolerance (compare does the same)
                    tol = tolerance_for(getattr(rt, "precision", "fp32"), atol, 0.0)
                    err = output_error(first, out.get(first, np.empty(0)), reference[first], *tol)
                    t.max_err = err.max_abs
                    if err.passed:  # a peer: checked here, timed in a fresh process per round
                        ready.append((t, FreshPeer(t.entry, shape, threads, target, checked=rt)
                                      if _is_peer(t.entry) else rt, []))
                    else:
                        t.status = "mismatch"
                        rt.release()
                done.append(t)
                bar.update(1 + (rounds if t.status != "ok" else 0))
            # entry -> its alone samples, for every peer checked equal
            alone = {t.entry: [] for t, _, _ in ready if check_alone and _is_peer(t.entry)}
            for r in range(rounds):
                for t, rt, secs in ready:
                    bar.set_postfix_str(f"{shape.name}: {t.entry} (round {r + 1}/{rounds})")
                    kw = dict(warmup=3 if r == 0 else 1, min_runs=max(1, 10 // rounds), min_s=min_s / rounds,
                              max_s=20.0 / rounds)
                    if t.status == "ok":
                        with _recorded(t):
                            # peers and the deployed entry time in their own processes; ours here
                            settle()  # no runtime timed before keeps a core: its pool spinning after a run
                            secs.extend(rt.time_runs(feeds, **kw))
                            if t.entry in alone:
                                alone[t.entry] += time_alone(t.entry, shape, threads, target, kw)
                    bar.update(1)
            for t, rt, secs in ready:
                if t.status == "ok":
                    t.median_ms, t.p90_ms, t.p99_ms = (round(float(np.percentile(secs, q)) * 1e3, 4)
                                                       for q in (50, 90, 99))
                    t.runs = len(secs)
                    t.gflops = round(shape.flops() / (t.median_ms / 1e3) / 1e9, 2)
                    if alone.get(t.entry):
                        t.alone_ms = round(float(np.median(alone[t.entry])) * 1e3, 4)
                        t.vs_alone = round(t.median_ms / t.alone_ms, 3)
                rt.release()
            peers = [t.median_ms for t in done if t.entry in PEERS]
            reduced = [t.median_ms for t in done if t.entry in REDUCED_PEERS]
            for t in done:
                t.ratio_to_best_peer = ratio_to_best(t.median_ms, peers)
                t.ratio_to_best_reduced = ratio_to_best(t.median_ms, reduced)
            report.timings += done
            if report.cpu:
                _best_peak(report.cpu, threads, target)
    bar.close()
    for t in report.timings:  # against the peak of the ISA the entry's code uses
        if report.cpu and t.gflops is not None:
            peak = report.cpu["kernel_peak_gflops" if t.entry.startswith("tvm") else "fma_peak_gflops"]
            t.pct_peak = round(100 * t.gflops / peak, 4)


def _best_peak(cpu: dict, threads, target) -> None:
    """Measures the FMA peaks again and keeps the best. On a VM the other core is at times taken
    by the host: one bench measured 385 GFLOP/s where 440-470 came before and after, which made
    the kernel look 82% efficient instead of 67%. The best of a measurement before the first shape
    and after each one is the bar."""
    fresh = machine_description(threads, target)
    for key in ("fma_peak_gflops", "kernel_peak_gflops"):
        cpu[key] = max(cpu[key], fresh[key])


def _run_once(name, model, threads, graph, feeds):
    rt = _runtime(name, model, threads)
    rt.prepare(graph)
    out = rt.run(feeds)
    rt.release()
    return out


