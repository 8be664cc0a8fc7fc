"""The compiled artifact and ONNX Runtime while the process shares its cores (issue #49): each bench
shape quiet, right after an ONNX Runtime run, and beside a busy thread; and the artifact's calls in a
fresh process against a warm one -> benchmarks/shared_cores_<machine>.{json,md}.

Usage: .venv/bin/python scripts/bench_shared_cores.py [--shape T,B,I,H[,L] ...] [--rounds N] [--min-s S]
       [--fresh-rounds N]
"""
import argparse
import json
from pathlib import Path

from lstm_export.common.machine import cpu_name
from lstm_export.harness.bench import DEFAULT_SHAPES, Shape
from lstm_export.harness.bench_report import machine_slug
from lstm_export.harness.fresh_start import fresh_vs_warm
from lstm_export.harness.fresh_start import markdown as fresh_markdown
from lstm_export.harness.shared_cores import as_json, markdown, measure
from lstm_export.runtimes.tvm_lstm import usable_cores

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--shape", action="append", default=[], help="T,B,I,H[,layers] (default: the bench's shapes)")
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--min-s", type=float, default=0.6, help="seconds per runtime and condition, over all rounds")
p.add_argument("--fresh-rounds", type=int, default=8,
               help="fresh processes per shape for fresh-against-warm (whole processes vary: more is steadier)")
p.add_argument("--out", default=None, help="file stem (default benchmarks/shared_cores_<machine>)")
args = p.parse_args()
shapes = [Shape.parse(s) for s in args.shape] or DEFAULT_SHAPES
rows = measure(shapes, usable_cores(), rounds=args.rounds, min_s=args.min_s)
fresh = fresh_vs_warm(shapes, usable_cores(), rounds=args.fresh_rounds)
machine = f"{cpu_name()}, {usable_cores()} cores"
out = Path(args.out or Path(__file__).resolve().parent.parent / "benchmarks" / f"shared_cores_{machine_slug()}")
out.with_suffix(".json").write_text(json.dumps(dict(as_json(rows, machine), fresh_start=fresh), indent=1) + "\n")
text = (markdown(rows, machine) + "\nThe artifact in a fresh process against a warm one "
        "(runtimes/deployed.py's worker, TVM's runtime alone):\n\n" + fresh_markdown(fresh))
out.with_suffix(".md").write_text(text)
print(text)
