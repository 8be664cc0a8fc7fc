"""Training-step bench: one forward + backward of lstm_export.LSTM against torch.nn.LSTM with the
same weights and inputs, interleaved in one process.

Every round times each entry once, in an order that rotates from round to round, so that a drift
of this shared machine (another tenant, the clock) falls on all of them alike; the result is the
median over rounds after warm-up, and the ratio to torch.nn.LSTM's median in the same run. The
gradients of each entry are checked against torch.nn.LSTM's before anything is timed (a fast wrong
answer is a failure, not a row).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SHAPES = ("T128,B64,I512,H512,L2", "T64,B32,I128,H256,L1", "T256,B8,I64,H128,L1")
ENTRIES = ("torch.nn.LSTM", "LSTM (native kernel)", "LSTM (autograd path)", "LayerNormLSTM (autograd)")
PEER = "torch.nn.LSTM"


@dataclass(frozen=True)
class TrainShape:
    T: int
    B: int
    I: int
    H: int
    L: int

    @classmethod
    def parse(cls, text: str) -> "TrainShape":
        from lstm_export.common.errors import UserError
        try:
            v = {p[0].upper(): int(p[1:]) for p in text.replace(" ", "").split(",")}
            return cls(v["T"], v["B"], v["I"], v["H"], v.get("L", 1))
        except (KeyError, ValueError, IndexError):
            raise UserError(f"shape {text!r} is not T..,B..,I..,H..[,L..] (e.g. T64,B32,I128,H256,L1)") from None

    @property
    def name(self) -> str:
        return f"T{self.T} B{self.B} I{self.I} H{self.H} L{self.L}"


@dataclass
class StepTiming:
    entry: str
    shape: str
    median_ms: float | None = None
    p90_ms: float | None = None
    rounds: int = 0
    ratio_to_nn: float | None = None
    max_rel_grad_err: float | None = None
    status: str = "ok"


@dataclass
class TrainBenchReport:
    machine: str
    threads: int
    native: str  # "on" or why the native kernel is not available
    timings: list[StepTiming] = field(default_factory=list)

    def markdown(self) -> str:
        rows = [f"Machine: {self.machine}; {self.threads} threads; native kernel: {self.native}.", "",
                "| shape | model | median ms | p90 ms | vs torch.nn.LSTM | max grad error | status |",
                "|---|---|---|---|---|---|---|"]
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
        for t in self.timings:
            name = f"**{t.entry}**" if "native" in t.entry else t.entry
            rows.append(f"| {t.shape} | {name} | {f(t.median_ms, '.2f')} | {f(t.p90_ms, '.2f')} | "
                        f"{f(t.ratio_to_nn, '.2f')} | {f(t.max_rel_grad_err, '.1e')} | {t.status} |")
        return "\n".join(rows)

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


def _models(entry: str, s: TrainShape):
    import torch

    from lstm_export import LSTM, LayerNormLSTM
    torch.manual_seed(0)
    if entry == PEER:
        return torch.nn.LSTM(s.I, s.H, s.L)
    m = (LayerNormLSTM if entry.startswith("LayerNorm") else LSTM)(s.I, s.H, s.L)
    m.use_native_kernel = "native" in entry
    return m


def _step(model, x):
    """One training step's forward + backward; returns the gradients (inputs, then parameters)."""
    x.grad = None
    for p in model.parameters():
        p.grad = None
    y, (h, c) = model(x)
    (y.sum() + h.sum() + c.sum()).backward()
    return [x.grad, *(p.grad for p in model.parameters())]


def bench_training(shapes=SHAPES, entries=ENTRIES, rounds: int | None = None, warmup: int = 2,
                   progress: bool = True) -> TrainBenchReport:
    import torch

    from lstm_export import native
    from lstm_export.common.machine import cpu_name
    report = TrainBenchReport(cpu_name(), torch.get_num_threads(),
                              "on" if native.kernel() is not None else native.unavailable_reason())
    for text in shapes:
        s = TrainShape.parse(text) if isinstance(text, str) else text
        torch.manual_seed(1)
        x = torch.randn(s.T, s.B, s.I, requires_grad=True)
        models = {e: _models(e, s) for e in entries}
        ref = models.get(PEER) or _models(PEER, s)
        want = _step(ref, x)
        rows = {}
        for e, m in models.items():
            if e != PEER and not e.startswith("LayerNorm"):
                m.load_state_dict(ref.state_dict())
            got = _step(m, x)
            err = None
            if not e.startswith("LayerNorm"):  # another model: nothing to compare with
                err = max(((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item() for g, w in zip(got, want))
            rows[e] = StepTiming(e, s.name, max_rel_grad_err=err,
                                 status="mismatch" if err is not None and err > 1e-4 else "ok")
        n = rounds or max(5, min(25, int(20 / max(1e-3, _seconds(models[PEER], x)))))
        samples = {e: [] for e in models}
        order = list(models)
        for r in range(warmup + n):
            for e in order[r % len(order):] + order[:r % len(order)]:
                t0 = time.perf_counter()
                _step(models[e], x)
                if r >= warmup:
                    samples[e].append(time.perf_counter() - t0)
            if progress:
                print(f"train bench: {s.name} round {r + 1}/{warmup + n}", flush=True)
        for e, t in rows.items():
            ms = sorted(v * 1e3 for v in samples[e])
            t.median_ms, t.p90_ms, t.rounds = statistics.median(ms), ms[int(0.9 * (len(ms) - 1))], len(ms)
        for t in rows.values():
            t.ratio_to_nn = round(t.median_ms / rows[PEER].median_ms, 3)
            report.timings.append(t)
    return report


def _seconds(model, x) -> float:
    t0 = time.perf_counter()
    _step(model, x)
    return time.perf_counter() - t0


def plot(report: TrainBenchReport, path) -> None:
    """Per shape, each model's step time as a ratio of torch.nn.LSTM's (1.0 dashed)."""
    from lstm_export.common.plotting import figure
    shapes = list(dict.fromkeys(t.shape for t in report.timings))
    entries = list(dict.fromkeys(t.entry for t in report.timings))
    with figure(path, (8, 3.2)) as (_, ax):
        width = 0.8 / len(entries)
        for k, e in enumerate(entries):
            vals = [next((t.ratio_to_nn for t in report.timings if t.shape == s and t.entry == e), 0) for s in shapes]
            ax.bar([i + k * width for i in range(len(shapes))], vals, width, label=e)
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, fontsize=8)
        ax.set_ylabel("step time / torch.nn.LSTM")
        ax.set_title(f"forward + backward, {report.machine}", fontsize=9)
        ax.legend(fontsize=7)
