"""Re-tunes the committed MetaSchedule database on the benchmark shapes and writes benchmarks/tuning.{json,md}.

Usage: .venv/bin/python scripts/tune_bench.py [TRIALS_PER_GRAPH]   (default 64; run on a quiet machine)
       .venv/bin/python scripts/tune_bench.py --render                 (rewrite tuning.md from tuning.json)
"""
import json
import sys
from pathlib import Path

from lstm_export.common.machine import cpu_name
from lstm_export.harness.tune import tune_shapes

out = Path(__file__).resolve().parent.parent / "benchmarks"
if sys.argv[1:] == ["--render"]:
    data = json.loads((out / "tuning.json").read_text())
else:
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    data = {"machine": cpu_name(), "trials_per_graph": trials, "rows": tune_shapes(trials=trials)}
    (out / "tuning.json").write_text(json.dumps(data, indent=1) + "\n")
trials, rows = data["trials_per_graph"], data["rows"]
lines = [
    f"MetaSchedule tuning of the generic kernels, {trials} trials per graph",
    "",
    f"Machine: {data['machine']}. Command: `.venv/bin/python scripts/tune_bench.py {trials}`. Kernel times are "
    "MetaSchedule's runner (mean of its repeats); 'before' is the best record before this run: on a first run, "
    "the schedule compile uses without a database.",
    "",
    "| shape | graph | kernel | before us | tuned us | speed-up |",
    "|---|---|---|---|---|---|",
]
for r in rows:
    if not r["before_ms"]:
        lines.append(f"| {r['shape']} | {r['graph']} | (no static kernels to tune) | - | - | - |")
    for name, d in r["before_ms"].items():
        b = r["best_ms"].get(name, d)
        lines.append(f"| {r['shape']} | {r['graph']} | {name} | {d * 1e3:,.1f} | {b * 1e3:,.1f} | {d / b:.2f}x |")
lines += ["", "| shape | graph | kernels tuned | tuning s | compile s with the database | kernels from it |",
          "|---|---|---|---|---|---|"]
lines += [f"| {r['shape']} | {r['graph']} | {r['kernels']} | {r['tune_s']:.0f} | {r['compile_s']:.1f} | "
          f"{r['kernels_from_db']} |"
          for r in rows]
(out / "tuning.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
