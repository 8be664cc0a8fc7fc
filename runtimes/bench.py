"""`lstm-export bench`: every runtime on the same LSTM shapes, outputs checked equal before timing.

Each entry is a runtime on a graph (native or unrolled ONNX, or a torch model). For each shape:
outputs are compared with torch.nn.LSTM first (a fast wrong answer is a failure, not a timing),
then warm-up, then repeated runs until at least `min_runs` and `min_s` seconds; median, p90, p99,
GFLOP/s, and the ratio of the median to the best peer's median measured in the same run.
Every entry of a shape is prepared first and then timed in `rounds` interleaved rounds (A B C A B C
...), so that a slow drift of the machine (another tenant, the clock) moves every entry's samples
alike instead of landing on whichever entry ran at the time.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lstm_export.errors import UserError

# (label, runtime, graph): graph is "native", "unrolled" or "model" (a torch runtime on our model)
ENTRIES = [
    ("torch (ours)", "torch", "model"),
    ("torch.nn.LSTM", "torch-nn", "model"),
    ("torch.compile (ours)", "torch-compile", "model"),
    ("ort-cpu native", "ort-cpu", "native"),
    ("ort-cpu unrolled", "ort-cpu", "unrolled"),
    ("openvino native", "openvino", "native"),
    ("tvm-llvm native", "tvm-llvm", "native"),
    ("tvm-llvm unrolled", "tvm-llvm", "unrolled"),
]
PEERS = ("torch.nn.LSTM", "ort-cpu native", "openvino native")  # what TVM has to beat
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
            return cls(*parts)
        except (TypeError, ValueError):
            raise UserError(f"--shape expects T,B,I,H[,layers] as integers, got {text!r}") from None


DEFAULT_SHAPES = [Shape(50, 128, 20, 100), Shape(32, 1, 128, 256), Shape(64, 64, 256, 512), Shape(1, 1, 256, 256, 2),
                  Shape(256, 1, 65, 512, 2, lm=True)]


@dataclass
class Timing:
    entry: str
    shape: str
    median_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    runs: int = 0
    gflops: float | None = None
    ratio_to_best_peer: float | None = None
    max_err: float | None = None
    status: str = "ok"  # ok | mismatch | unavailable | error


@dataclass
class BenchReport:
    machine: str
    threads: int
    timings: list[Timing] = field(default_factory=list)

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    def markdown(self) -> str:
        rows = ["| shape | runtime | median ms | p90 ms | p99 ms | GFLOP/s | vs best peer | status |",
                "|---|---|---|---|---|---|---|---|"]
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
        for t in self.timings:
            name = f"**{t.entry}**" if t.entry.startswith("tvm") else t.entry
            rows.append(f"| {t.shape} | {name} | {f(t.median_ms, '.3f')} | {f(t.p90_ms, '.3f')} | {f(t.p99_ms, '.3f')} | "
                        f"{f(t.gflops, '.1f')} | {f(t.ratio_to_best_peer, '.2f')} | {t.status} |")
        return "\n".join(rows)

    def table(self) -> str:
        rows = [f"{'shape':<32}{'runtime':<22}{'median ms':>10}{'p90':>9}{'p99':>9}{'GFLOP/s':>9}{'vs best peer':>13}  status"]
        for t in self.timings:
            f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
            rows.append(f"{t.shape:<32}{t.entry:<22}{f(t.median_ms, '10.3f')}{f(t.p90_ms, '9.3f')}{f(t.p99_ms, '9.3f')}"
                        f"{f(t.gflops, '9.1f')}{f(t.ratio_to_best_peer, '13.2f')}  {t.status}")
        return "\n".join(rows)


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


def _runtime(name: str, model, threads: int):
    from .base import get_runtime, runtime_class
    if name == "torch-compile":
        from .torch_runtime import TorchCompileRuntime
        return TorchCompileRuntime(model=model, threads=threads)
    if name == "torch-nn-cuda":
        return get_runtime("torch-nn", model=model, device="cuda")
    cls = runtime_class(name)
    avail = cls.availability()
    if not avail:
        raise _Unavailable(avail.reason)
    kwargs = {"model": model} if name in ("torch", "torch-nn") else {}
    if "threads" in cls.__init__.__code__.co_varnames:
        kwargs["threads"] = threads
    return cls(**kwargs)


class _Unavailable(Exception):
    pass


def describe(e: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    first = str(e).splitlines()[0][:120] if str(e) else ""
    return f"{type(e).__name__}: {first}"


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
        t.status = f"error: {describe(e)}"


def time_runs(fn, warmup: int = 3, min_runs: int = 10, min_s: float = 1.0, max_runs: int = 500,
              max_s: float = 20.0) -> np.ndarray:
    """Seconds per call after `warmup` calls: at least min_runs and min_s, at most max_runs or max_s."""
    for _ in range(warmup):
        fn()
    times, t_start = [], time.perf_counter()
    while len(times) < max_runs:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - t_start
        if (len(times) >= min_runs and spent >= min_s) or spent >= max_s:
            break
    return np.array(times)


def bench(shapes=None, entries=None, threads: int | None = None, atol: float = 1e-4, min_s: float = 1.0,
          rounds: int = 3, progress: bool = True) -> BenchReport:
    """Benchmarks `entries` (labels from ENTRIES) on `shapes`, each timed for `min_s` seconds in all,
    split over `rounds` interleaved rounds; see the module docstring."""
    from tqdm import tqdm

    from lstm_export.export import export_onnx
    from lstm_export.report import cpu_name
    threads = threads or os.cpu_count() or 1
    os.environ["TVM_NUM_THREADS"] = str(threads)  # read when TVM's thread pool starts
    shapes = shapes or DEFAULT_SHAPES
    table = {label: (rt, graph) for label, rt, graph in ENTRIES + GPU_ENTRIES}
    labels = entries or [label for label, _, _ in ENTRIES]
    unknown = [e for e in labels if e not in table]
    if unknown:
        raise UserError(f"unknown bench entries {unknown}; choose from {list(table)}")
    if rounds < 1:
        raise UserError(f"--rounds {rounds} must be at least 1")
    report = BenchReport(cpu_name(), threads)
    jobs = [(s, e) for s in shapes for e in labels]
    bar = tqdm(total=len(jobs) * (1 + rounds), disable=not progress, desc="bench", unit="step")
    with tempfile.TemporaryDirectory(prefix="lstm-export-bench-") as tmp:
        for shape in shapes:
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
                    rt = _runtime(rt_name, model, threads)
                    rt.prepare(graphs.get(graph))
                    out = rt.run(feeds)
                    t.max_err = float(np.abs(out[first] - reference[first]).max())
                    if t.max_err <= atol:
                        ready.append((t, rt, []))
                    else:
                        t.status = "mismatch"
                        rt.release()
                done.append(t)
                bar.update(1 + (rounds if t.status != "ok" else 0))
            for r in range(rounds):
                for t, rt, secs in ready:
                    bar.set_postfix_str(f"{shape.name}: {t.entry} (round {r + 1}/{rounds})")
                    if t.status == "ok":
                        with _recorded(t):
                            secs.extend(time_runs(lambda: rt.run(feeds), warmup=3 if r == 0 else 1,
                                                  min_runs=max(1, 10 // rounds), min_s=min_s / rounds,
                                                  max_s=20.0 / rounds))
                    bar.update(1)
            for t, rt, secs in ready:
                if t.status == "ok":
                    t.median_ms, t.p90_ms, t.p99_ms = (round(float(np.percentile(secs, q)) * 1e3, 4)
                                                       for q in (50, 90, 99))
                    t.runs = len(secs)
                    t.gflops = round(shape.flops() / (t.median_ms / 1e3) / 1e9, 2)
                rt.release()
            peers = [t.median_ms for t in done if t.entry in PEERS and t.median_ms is not None]
            for t in done:
                if peers and t.median_ms is not None:
                    t.ratio_to_best_peer = round(t.median_ms / min(peers), 3)
            report.timings += done
    bar.close()
    return report


def tune_shapes(shapes=None, trials: int = 64, tuning_db=None, threads: int | None = None,
                progress: bool = True) -> list[dict]:
    """MetaSchedule-tunes the kernels of each shape's graphs into the tuning database that `compile`
    reads (default: the committed one for this CPU), `trials` per graph; then compiles each graph with
    it. Native graphs have dynamic T and B, so only their static kernels (none, today) are tuned.
    Returns one row per graph: tuned kernels, their ms before and after, tuning and compile seconds."""
    import json

    from lstm_export.export import export_onnx

    from .tvm_lstm.compile import compile_onnx
    rows = []
    with tempfile.TemporaryDirectory(prefix="lstm-export-tune-") as tmp:
        for shape in shapes or DEFAULT_SHAPES:
            model = _model(shape)
            for graph in ("native", "unrolled"):
                path = Path(tmp) / f"{graph}.onnx"
                kwargs = {"seq_len": shape.T, "batch_size": shape.B} if graph == "unrolled" else {}
                export_onnx(model, path, graph, **kwargs)
                if progress:
                    print(f"{shape.name} {graph}", flush=True)
                compile_onnx(path, Path(tmp) / "out", "llvm", threads=threads, tuning_db=tuning_db,
                             tune_trials=trials, progress=progress)
                meta = json.loads((Path(tmp) / "out" / "meta.json").read_text())
                tuning = meta.get("tuning") or {}
                rows.append({"shape": shape.name, "graph": graph, "kernels": len(tuning.get("tasks", [])),
                             "trials": tuning.get("trials", 0), "tune_s": tuning.get("seconds", 0.0),
                             "before_ms": tuning.get("before_ms", {}), "best_ms": tuning.get("best_ms", {}),
                             "kernels_from_db": meta["kernels_from_db"], "compile_s": meta["compile_s"]})
    return rows


def _run_once(name, model, threads, graph, feeds):
    rt = _runtime(name, model, threads)
    rt.prepare(graph)
    out = rt.run(feeds)
    rt.release()
    return out


def plot(report: BenchReport, path) -> None:
    """One panel per shape: median ms per runtime (log scale), the best peer's line dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(dict.fromkeys(t.shape for t in report.timings))
    fig, axes = plt.subplots(len(shapes), 1, figsize=(8, 2.2 * len(shapes)), dpi=100, squeeze=False)
    for ax, s in zip(axes[:, 0], shapes):
        rows = [t for t in report.timings if t.shape == s and t.median_ms is not None]
        ax.barh([t.entry for t in rows], [t.median_ms for t in rows],
                color=["tab:orange" if t.entry.startswith("tvm") else
                       "tab:blue" if t.entry in PEERS else "tab:gray" for t in rows])
        peers = [t.median_ms for t in rows if t.entry in PEERS]
        if peers:
            ax.axvline(min(peers), color="k", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(s, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.invert_yaxis()
    axes[-1, 0].set_xlabel(f"median ms ({report.threads} threads, {report.machine}); dashed: best peer")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
