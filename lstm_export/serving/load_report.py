"""The load test's results: medians over rounds, the goals of issue #48 as ratios against the peers of
the same run, a markdown table, a JSON file and a plot (benchmarks/serve_load_<cpu>.*)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

from lstm_export.common.plotting import figure

from .loadtest import LoadResult

# serve against the bare endpoint: p50 at 1 client within 1.1x, requests/s at 8 and 32 clients 1.3x;
# against Triton: p50 at 1 client no higher, requests/s at 8 clients no lower
GOALS = [("bare", 1, "p50", 1.1), ("bare", 8, "rps", 1.3), ("bare", 32, "rps", 1.3),
         ("triton", 1, "p50", 1.0), ("triton", 8, "rps", 1.0)]


@dataclass
class Goal:
    peer: str
    tensors: str
    clients: int
    metric: str  # p50 (serve / peer, at most bar) or rps (serve / peer, at least bar)
    bar: float
    ratio: float

    @property
    def met(self) -> bool:
        return self.ratio <= self.bar if self.metric == "p50" else self.ratio >= self.bar

    def line(self) -> str:
        what = "p50" if self.metric == "p50" else "requests/s"
        sign = "<=" if self.metric == "p50" else ">="
        return (f"{self.tensors}, {self.clients} client(s): serve {what} x{self.ratio:.2f} {self.peer}'s "
                f"(goal {sign} x{self.bar}): {'met' if self.met else 'NOT met'}")


@dataclass
class LoadReport:
    machine: str
    command: str
    model: str
    rounds: list[list[LoadResult]] = field(default_factory=list)  # one list of blocks per round

    def rows(self) -> list[LoadResult]:
        """One row per (server, tensors, clients): the median of each number over the rounds."""
        groups: dict[tuple, list[LoadResult]] = {}
        for rnd in self.rounds:
            for r in rnd:
                groups.setdefault((r.server, r.tensors, r.clients), []).append(r)
        out = []
        for (server, tensors, clients), rs in groups.items():
            rows = [r.rows_per_run for r in rs if r.rows_per_run is not None]
            out.append(LoadResult(server, tensors, clients, sum(r.requests for r in rs), sum(r.errors for r in rs),
                                  sum(r.mismatches for r in rs), round(sum(r.seconds for r in rs), 3),
                                  _mid(rs, "requests_per_s", 1), _mid(rs, "p50_ms"), _mid(rs, "p99_ms"),
                                  _mid(rs, "server_cpu_ms"), round(median(rows), 2) if rows else None))
        return sorted(out, key=lambda r: (r.clients, r.tensors, _ORDER.get(r.server, 9), r.server))

    def goals(self) -> list[Goal]:
        rows = {(r.server, r.tensors, r.clients): r for r in self.rows()}
        out = []
        for peer, clients, metric, bar in GOALS:
            for tensors in ("json", "binary"):
                ours, theirs = rows.get(("serve", tensors, clients)), rows.get((peer, tensors, clients))
                if ours is None or theirs is None:
                    continue
                ratio = (ours.p50_ms / theirs.p50_ms if metric == "p50"
                         else ours.requests_per_s / theirs.requests_per_s)
                out.append(Goal(peer, tensors, clients, metric, bar, round(ratio, 3)))
        return out

    def table(self) -> str:
        lines = ["| server | tensors | clients | requests | errors | mismatched streams | requests/s | p50 ms | "
                 "p99 ms | server CPU ms/request | rows/run |", "|" + "---|" * 11]
        lines += [f"| {r.server} | {r.tensors} | {r.clients} | {r.requests} | {r.errors} | {r.mismatches} | "
                  f"{r.requests_per_s:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.server_cpu_ms:.2f} | "
                  f"{'' if r.rows_per_run is None else r.rows_per_run} |" for r in self.rows()]
        return "\n".join(lines)

    def summary(self) -> str:
        """serve beside its peers, one row per client count and tensor encoding: requests/s (p50 ms),
        and serve's ratios to each peer (p50, requests/s)."""
        rows = {(r.server, r.tensors, r.clients): r for r in self.rows()}
        peers = [p for p in ("bare", "triton") if any(k[0] == p for k in rows)]
        names = {"bare": "bare endpoint", "triton": "Triton"}
        lines = ["| clients | tensors | `serve` | " + " | ".join(names[p] for p in peers) + " | "
                 + " | ".join(f"`serve` / {names[p]}: p50, requests/s" for p in peers) + " |",
                 "|" + "---|" * (3 + 2 * len(peers))]
        for (server, tensors, clients), ours in rows.items():
            if server != "serve" or not all((p, tensors, clients) in rows for p in peers):
                continue
            theirs = [rows[p, tensors, clients] for p in peers]
            lines.append(f"| {clients} | {tensors} | {_cell(ours)} | " + " | ".join(_cell(t) for t in theirs) + " | "
                         + " | ".join(f"{ours.p50_ms / t.p50_ms:.2f}x, {ours.requests_per_s / t.requests_per_s:.2f}x"
                                      for t in theirs) + " |")
        return "\n".join(lines)

    def write(self, prefix: str | Path) -> None:
        prefix = Path(prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".json").write_text(json.dumps(
            {"machine": self.machine, "command": self.command, "model": self.model,
             "rows": [asdict(r) for r in self.rows()], "goals": [dict(asdict(g), met=g.met) for g in self.goals()],
             "rounds": [[asdict(r) for r in rnd] for rnd in self.rounds]}, indent=1) + "\n")
        goals = "\n".join(f"- {g.line()}" for g in self.goals())
        prefix.with_suffix(".md").write_text(
            f"Serving load test on loopback\n\nMachine: {self.machine}. Model: {self.model}. Command: "
            f"`{self.command}`. Medians over {len(self.rounds)} rounds; each server in its own block.\n\n"
            f"{self.summary()}\n\nEvery row:\n\n{self.table()}\n\nGoals (issue #48):\n\n{goals}\n")
        self.plot(prefix.with_suffix(".png"))

    def plot(self, path: Path) -> None:
        """Requests/s and p50 per server, one group of bars per client count, JSON and binary side by side."""
        rows = [r for r in self.rows() if r.errors == 0]
        keys = list(dict.fromkeys((r.server, r.tensors) for r in rows))
        counts = sorted({r.clients for r in rows})
        by = {(r.server, r.tensors, r.clients): r for r in rows}
        width = 0.8 / max(len(keys), 1)
        with figure(path, (9, 6), nrows=2) as (_, (top, bottom)):
            for i, (server, tensors) in enumerate(keys):
                xs = [k + i * width for k in range(len(counts)) if (server, tensors, counts[k]) in by]
                got = [by[server, tensors, c] for c in counts if (server, tensors, c) in by]
                style = dict(width=width, color=_COLORS.get(server, "tab:gray"), hatch="//" if tensors == "binary"
                             else None, edgecolor="white", label=f"{server} ({tensors})")
                top.bar(xs, [r.requests_per_s for r in got], **style)
                bottom.bar(xs, [r.p50_ms for r in got], **style)
            for ax, label in ((top, "requests/s (higher is better)"), (bottom, "p50 ms (lower is better)")):
                ax.set_xticks([k + 0.4 - width / 2 for k in range(len(counts))], [f"{c} client(s)" for c in counts])
                ax.set_ylabel(label, fontsize=9)
                ax.tick_params(labelsize=8)
            top.set_ylim(0, 1.35 * max((r.requests_per_s for r in rows), default=1))  # room for the legend
            top.legend(fontsize=7, ncol=4, loc="upper left")
            bottom.set_yscale("log")
            top.set_title(f"{self.model}\n{self.machine}", fontsize=9)


def _cell(r: LoadResult) -> str:
    return f"{r.requests_per_s:.0f} ({r.p50_ms:.2f})"


def _mid(rows: list[LoadResult], field: str, digits: int = 3) -> float:
    return round(median(getattr(r, field) for r in rows), digits)


_ORDER = {"serve": 0, "bare": 1, "triton": 2}
_COLORS = {"serve": "tab:orange", "bare": "tab:gray", "triton": "tab:green", "serve /v1": "tab:red",
           "serve x2 (Ray)": "tab:purple"}
