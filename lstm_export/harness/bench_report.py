"""The bench's results: timings per (shape, entry), where they were measured, markdown and a PNG."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lstm_export.common.plotting import figure

# what TVM has to beat: every peer entry a user could pick, the peers' unrolled graphs included
# (at one streaming step ORT's unrolled graph beats ORT's LSTM op)
PEERS = ("torch.nn.LSTM", "ort-cpu native", "ort-cpu unrolled", "openvino native")
REDUCED_PEERS = ("openvino native (default)", "ort-cpu native int8")  # what our bf16 row has to beat


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
    pct_peak: float | None = None  # GFLOP/s as % of the measured FMA peak of the ISA the entry's kernel uses
    ratio_to_best_reduced: float | None = None  # against the best reduced-precision peer (REDUCED_PEERS)
    status: str = "ok"  # ok | mismatch | unavailable | error
    alone_ms: float | None = None  # bench --check-alone: the entry alone in a fresh process (bench_alone.py)
    vs_alone: float | None = None  # median_ms / alone_ms


@dataclass
class BenchReport:
    machine: str
    threads: int
    timings: list[Timing] = field(default_factory=list)
    # where it ran: CPU model, the ISA our kernel was built for, caches, cores, measured FMA peaks
    cpu: dict = field(default_factory=dict)

    def header(self) -> str:
        """Where the run happened, in one paragraph (the markdown file's and the console's first line)."""
        c = self.cpu
        if not c:
            return f"Machine: {self.machine}, {self.threads} threads."
        peak = (f"measured FP32 FMA peak {c['fma_peak_gflops']:.0f} GFLOP/s ({c['machine_isa']}, {self.threads} "
                "threads, the best of one measurement before the first shape and one after each)")
        if c.get("kernel_isa") != c.get("machine_isa"):
            peak += f", {c['kernel_peak_gflops']:.0f} GFLOP/s with {c['kernel_isa']} (our kernel's ISA)"
        return (f"Machine: {self.machine}; {c['cores']} cores; L1d {c['l1d_kb']} KB, L2 {c['l2_kb']} KB per core, "
                f"L3 {c['l3_mb']} MB; tvm-llvm built for `{c['target']}` ({c['kernel_isa']}); {peak}.")

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    def markdown(self) -> str:
        rows = ["| shape | runtime | median ms | p90 ms | p99 ms | GFLOP/s | % of peak | vs best peer | "
                "vs best reduced-precision peer | max abs err vs fp32 | alone ms (other fresh processes) | status |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
        for t in self.timings:
            name = f"**{t.entry}**" if t.entry.startswith("tvm") else t.entry
            rows.append(
                f"| {t.shape} | {name} | {f(t.median_ms, '.3f')} | {f(t.p90_ms, '.3f')} | {f(t.p99_ms, '.3f')} | "
                f"{f(t.gflops, '.1f')} | {f(t.pct_peak, '.0f')} | {f(t.ratio_to_best_peer, '.2f')} | "
                f"{f(t.ratio_to_best_reduced, '.2f')} | {f(t.max_err, '.1e')} | {f(t.alone_ms, '.3f')} | {t.status} |"
            )
        return "\n".join(rows)

    def table(self) -> str:
        w = max([32, *(len(t.shape) + 2 for t in self.timings)])  # a model bench's label can be long
        rows = [f"{'shape':<{w}}{'runtime':<28}{'median ms':>10}{'p90':>9}{'p99':>9}{'GFLOP/s':>9}{'%peak':>6}"
                f"{'vs best peer':>13}{'vs reduced':>11}{'err':>9}  status"]
        for t in self.timings:
            f = lambda v, fmt: format(v, fmt) if v is not None else "-".rjust(int(fmt.split(".")[0]))  # noqa: E731
            rows.append(f"{t.shape:<{w}}{t.entry:<28}{f(t.median_ms, '10.3f')}{f(t.p90_ms, '9.3f')}"
                        f"{f(t.p99_ms, '9.3f')}{f(t.gflops, '9.1f')}{f(t.pct_peak, '6.0f')}"
                        f"{f(t.ratio_to_best_peer, '13.2f')}{f(t.ratio_to_best_reduced, '11.2f')}"
                        f"{f(t.max_err, '9.1e')}  {t.status}")
        return "\n".join(rows)


def plot(report: BenchReport, path, peers=PEERS) -> None:
    """One panel per shape: median ms per runtime (log scale), the best peer's line dashed."""
    shapes = list(dict.fromkeys(t.shape for t in report.timings))
    with figure(path, (8, 2.2 * len(shapes)), nrows=len(shapes)) as (_, axes):
        for ax, s in zip(axes, shapes):
            rows = [t for t in report.timings if t.shape == s and t.median_ms is not None]
            ax.barh([t.entry for t in rows], [t.median_ms for t in rows],
                    color=["tab:orange" if t.entry.startswith("tvm") else
                           "tab:blue" if t.entry in peers else "tab:gray" for t in rows])
            peer_ms = [t.median_ms for t in rows if t.entry in peers]
            if peer_ms:
                ax.axvline(min(peer_ms), color="k", linestyle="--", linewidth=1)
            ax.set_xscale("log")
            ax.set_title(s, fontsize=9)
            ax.tick_params(labelsize=8)
            ax.invert_yaxis()
        axes[-1].set_xlabel(f"median ms ({report.threads} threads, {report.machine}); dashed: best peer")


def machine_slug(target: str | None = None) -> str:
    """A results file's name for this machine: CPU model and its ISA, plus the ISA built for when a
    --target builds another (e.g. intel-xeon-processor-avx512, intel-xeon-processor-avx512-build-avx2)."""
    import re

    from lstm_export.common.machine import cpu_name
    from lstm_export.runtimes.tvm_lstm import host_target, isa_of, parse_target
    model = re.sub(r"\(r\)|\(tm\)|\(\d+ cores\)|cpu|@.*", "", cpu_name().lower())
    slug = "-".join(re.findall(r"[a-z0-9]+", model))
    isa, built = isa_of(host_target()), isa_of(parse_target(target)) if target else None
    return f"{slug}-{isa}" + (f"-build-{built}" if built and built != isa else "")
