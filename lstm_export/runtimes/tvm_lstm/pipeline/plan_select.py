"""Measured plan selection: on the machine it runs on, `compile` times a few kernel plans on the
model's own shapes and keeps the fastest (the way FFTW's planner and ATLAS choose by measuring).

The plan derived from the target (cpu_plan.make_plan) is right where its rules were measured and
can be wrong elsewhere: the same ISA runs at different widths (Zen 4 executes AVX-512 on 256-bit
units), caches differ, and so does the batch size where one split overtakes the other. So, for
a target this machine runs (cpu_plan.is_host), each candidate plan is imported and compiled as
the whole model, and the candidates are timed in interleaved rounds (A B C A B C ...) in a fresh
thread whose TVM pool has the plan's thread count. Invariants:
- the derived plan is always built and timed first, and stays unless another candidate's median
  is at least MARGIN faster: a choice made on noise would move between compiles;
- a candidate whose module is the derived one's (or an earlier candidate's) is not timed again:
  cpu.layer_plan turns thresholds into the decisions they make, so e.g. a split threshold that
  decides alike for every layer of this model gives the same module;
- no candidate is started once its expected cost would overrun the budget;
- the choice is cached per CPU model, target, threads, layer structure and timing shapes (not the
  weights) under $XDG_CACHE_HOME/lstm-export/plans, with the compiler's source digest in the key,
  so the second compile of that model, or of any with the same layers, measures nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lstm_export.common import cbuild

DEFAULT_BUDGET_S = 10.0
BUDGET_ENV = "LSTM_EXPORT_PLAN_BUDGET_S"  # the default budget where --plan-budget-s is not given
MARGIN = 0.05  # a candidate replaces the derived plan only when at least 5% faster (repeat compiles of
# one model on the Zen 4 VM moved the medians of equal kernels by up to 5%)
ROUNDS = 3
MIN_S, MAX_S = 0.2, 1.5  # of samples per candidate per round (at least 5 calls)
SYMBOLIC_DIM = 16  # a dimension the model leaves open is timed at this size (compile --input-shape fixes it)


@dataclass
class PlanChoice:
    """What compile chose and why; written into meta.json as `plan_selection`."""

    source: str  # "measured", "cache" or "derived"
    chosen: str
    why: str = ""
    budget_s: float = 0.0
    spent_s: float = 0.0
    timed_at: dict = field(default_factory=dict)  # input name -> shape the candidates ran at
    candidates: list = field(default_factory=list)  # {"name", "plan", "ms" | "skipped"}

    def summary(self) -> str:
        if self.source == "derived":
            return f"kernel plan derived from the target ({self.why})"
        timed = [c for c in self.candidates if c.get("ms") is not None]
        base = next((c["ms"] for c in timed if c["name"] == "derived"), None)
        best = next((c["ms"] for c in timed if c["name"] == self.chosen), None)
        gain = f", {best / base:.2f}x the derived plan" if base and best else ""
        where = "from the plan cache" if self.source == "cache" else f"measured in {self.spent_s:.1f} s"
        return f"kernel plan {self.chosen!r} ({where}: {len(timed)} candidate(s) timed{gain})"


def budget_from(value: float | None) -> float:
    """The plan budget in seconds: `value`, else $LSTM_EXPORT_PLAN_BUDGET_S, else DEFAULT_BUDGET_S."""
    if value is not None:
        return float(value)
    text = os.environ.get(BUDGET_ENV)
    try:
        return float(text) if text else DEFAULT_BUDGET_S
    except ValueError:
        from lstm_export.common.errors import UserError
        raise UserError(f"{BUDGET_ENV}={text!r} is not a number of seconds; set it to e.g. 10, or 0 "
                        "to use the derived plan") from None


def candidates(base) -> list[tuple[str, object]]:
    """The plans tried, most likely to matter first: the split between cores both ways, fewer
    register rows, the row path's projection split both ways. Every one is valid for base's ISA."""
    from ..kernels.cpu_plan import ALL, NONE
    out = [("derived", base), ("batch split", dataclasses.replace(base, batch_split_bytes=ALL)),
           ("step split", dataclasses.replace(base, batch_split_bytes=NONE))]
    for mr in (base.mr - 1, base.mr - 2):
        if mr >= 2:
            ms = max(1, mr - mr // 3)
            out.append((f"{mr} register rows", dataclasses.replace(base, mr=mr, ms=ms, ra=min(base.ra, mr))))
    out += [("projection split", dataclasses.replace(base, unit_major_bytes=NONE)),
            ("projection shared", dataclasses.replace(base, unit_major_bytes=ALL))]
    return out


def plan_fields(plan) -> dict:
    return {k: v for k, v in dataclasses.asdict(plan).items() if k != "info"}


def cache_key(model, target, plan, feeds: dict[str, np.ndarray]) -> str:
    """Per CPU model, target, threads, layer structure (the recurrent nodes' attributes and weight
    shapes, not their values), timing shapes and compiler source."""
    from tvm.target import codegen

    from .source_digest import compiler_digest
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    layers = [(n.op_type, sorted((a.name, str(a)) for a in n.attribute), [inits.get(i) for i in n.input])
              for n in model.graph.node if n.op_type in ("LSTM", "GRU", "RNN")]
    parts = {"cpu": _cpu_name(), "llvm_cpu": codegen.llvm_get_system_cpu(), "target": str(target.export()),
             "plan": plan_fields(plan), "layers": layers, "ops": sorted({n.op_type for n in model.graph.node}),
             "feeds": {k: list(v.shape) for k, v in sorted(feeds.items())}, "compiler": compiler_digest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _cpu_name() -> str:
    """The CPU's model name, family and model numbers from /proc/cpuinfo ("" where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    first = text.split("\n\n", 1)[0]
    keep = ("model name", "cpu family", "model", "stepping", "vendor_id", "CPU implementer", "CPU part")
    return "; ".join(line.strip() for line in first.splitlines() if line.split(":")[0].strip() in keep)


def plans_root() -> Path:
    return cbuild.cache_root("plans")


def cached_choice(key: str, root: Path | None = None) -> dict | None:
    try:
        return json.loads(((root or plans_root()) / f"{key}.json").read_text())
    except (OSError, ValueError):  # absent, or a torn or foreign file: measured again
        return None


def store_choice(key: str, record: dict, root: Path | None = None) -> None:
    root = root or plans_root()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(root / f"{key}.json")  # whole or not at all; concurrent writers write the same choice


def timing_feeds(source, static: dict, dims: dict | None) -> dict[str, np.ndarray]:
    """Random inputs at the shapes the artifact will take: static ones as compiled, named dims as
    given, any other open dimension at SYMBOLIC_DIM."""
    from ...model_io import random_feeds
    named = dict(dims or {})
    for s in source.inputs:
        if s.name in static:
            named.update({d: n for d, n in zip(s.shape, static[s.name]) if isinstance(d, str)})
    for s in source.inputs:
        for d in s.shape:
            if not (isinstance(d, int) and d > 0):
                named.setdefault(d, SYMBOLIC_DIM)
    feeds = random_feeds(source, seed=0, dims=named)
    for name, shape in static.items():
        if name in feeds and feeds[name].shape != tuple(shape):
            feeds[name] = np.resize(feeds[name], shape)
    return feeds


def select(model, target, base, builder, feeds: dict[str, np.ndarray], budget_s: float, derived_mod=None,
           progress=None):
    """(plan, built, PlanChoice): the fastest of `candidates(base)` on `feeds` (main's arguments, in
    order) within `budget_s`. builder.module(plan) -> the IRModule imported with plan;
    builder.build(plan, module) -> a builder.Built. `built` is the chosen plan's, never run (each
    candidate is timed from a library exported from it); None when the choice came from the cache
    (build it then). derived_mod: the model already imported with `base`. progress(text) is called
    per candidate."""
    key = cache_key(model, target, base, feeds)
    timed_at = {k: list(v.shape) for k, v in feeds.items()}
    hit = cached_choice(key)
    by_name = dict(candidates(base))
    if hit and hit.get("chosen") in by_name:
        return by_name[hit["chosen"]], None, PlanChoice("cache", hit["chosen"], budget_s=budget_s,
                                                        timed_at=timed_at, candidates=hit.get("candidates", []))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lstm-export-plans-") as libs:
        medians, built, records = _measure(base, builder, feeds, budget_s, derived_mod, progress, Path(libs))
    chosen = pick(medians)
    spent = round(time.perf_counter() - start, 2)
    store_choice(key, {"chosen": chosen, "candidates": records, "spent_s": spent, "timed_at": timed_at})
    choice = PlanChoice("measured", chosen, budget_s=budget_s, spent_s=spent, timed_at=timed_at, candidates=records)
    return by_name[chosen], built[chosen], choice


def _measure(base, builder, feeds, budget_s: float, derived_mod, progress, libs: Path):
    """({name: median seconds}, {name: Built}, records): the candidates built and timed within the
    budget, their libraries exported into `libs` to be timed."""
    import tvm_ffi
    start = time.perf_counter()
    built, runs, records, seen, costs, timing_s = {}, {}, [], {}, [], 0.0
    for name, plan in candidates(base):
        # what is spent, the timing still owed to the candidates built, and this one's build and timing
        expected = time.perf_counter() - start + (len(costs) + 1) * timing_s + (sum(costs) / len(costs) if costs else 0)
        if name != "derived" and expected > budget_s:
            records.append({"name": name, "plan": plan_fields(plan), "skipped": "over the budget"})
            continue
        t0 = time.perf_counter()
        mod = derived_mod if name == "derived" and derived_mod is not None else builder.module(plan)
        digest = tvm_ffi.structural_hash(mod)
        if digest in seen:
            records.append({"name": name, "plan": plan_fields(plan),
                            "skipped": f"the same kernels as {seen[digest]!r}"})
            continue
        seen[digest] = name
        if progress:
            progress(f"plan {name!r}")
        built[name] = builder.build(plan, mod)
        runs[name] = _runner(built[name].executable, feeds, libs / f"{len(built)}.so")
        if name == "derived":  # one call after a warm-up says what timing a candidate will cost
            call_s = _time_interleaved({name: runs[name]}, base.threads, rounds=1, quick=True)[name]
            timing_s = ROUNDS * min(MAX_S, max(MIN_S, 7 * call_s))
        costs.append(time.perf_counter() - t0)
        records.append({"name": name, "plan": plan_fields(plan)})
    medians = _time_interleaved(runs, base.threads)
    for r in records:
        if r["name"] in medians:
            r["ms"] = round(medians[r["name"]] * 1e3, 6)
    return medians, built, records


def pick(medians: dict[str, float]) -> str:
    """The fastest candidate if it beats "derived" by MARGIN, else "derived"."""
    best = min(medians, key=medians.get)
    return best if medians[best] <= (1 - MARGIN) * medians["derived"] else "derived"


def _runner(executable, feeds, path: Path):
    """A call of the executable's main on `feeds` (inputs in graph order; the VM made lazily, in the
    timing thread, so that its launches use that thread's pool). The VM runs a library exported to
    `path` and loaded back, the same code: the executable itself never runs, so the winner is
    exported as built (one that a VM has run exports with its VM's state)."""
    import tvm
    from tvm import relax
    executable.export_library(str(path))
    state = {}

    def run():
        if "main" not in state:
            vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
            state["args"] = [tvm.runtime.tensor(a) for a in feeds.values()]
            state["main"] = vm["main"]
        return state["main"](*state["args"])
    return run


def _time_interleaved(runs: dict, threads: int, rounds: int = ROUNDS, quick: bool = False) -> dict[str, float]:
    """Median seconds per call of each run over interleaved rounds (quick: one call after one
    warm-up), in a fresh thread: TVM's pool is per calling thread and takes its size when it
    starts, so there it has `threads`."""
    from lstm_export.common.timing import time_runs

    from ..target.thread_pool import pool_threads
    samples = {n: [] for n in runs}
    failure = []

    def work():
        try:
            for _ in range(rounds):
                for n, fn in runs.items():
                    samples[n] += time_runs(fn, warmup=1, min_runs=1, min_s=0, max_runs=1) if quick else \
                        time_runs(fn, warmup=2, min_runs=5, min_s=MIN_S, max_runs=200, max_s=MAX_S)
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread
            failure.append(e)
    with pool_threads(threads):
        t = threading.Thread(target=work, name="lstm-export-plan-timing")
        t.start()
        t.join()
    if failure:
        raise failure[0]
    return {n: float(np.median(v)) for n, v in samples.items()}
