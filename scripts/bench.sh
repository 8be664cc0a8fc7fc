#!/usr/bin/env bash
# CPU speed benchmark: every runtime on the benchmark shapes -> benchmarks/bench_cpu_<machine>.{json,png,md},
# the file named by this CPU and its ISA (and the ISA built for, with TARGET).
# OpenVINO is an optional peer: install it with .venv/bin/pip install -e '.[peers]'.
# TARGET='llvm -mcpu=haswell' ./scripts/bench.sh builds tvm-llvm for AVX2 on an AVX-512 machine.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks
name=$(.venv/bin/python -c 'import sys; from lstm_export.harness.bench_report import machine_slug; print(machine_slug(sys.argv[1] or None))' "${TARGET:-}")
out=benchmarks/bench_cpu_$name
.venv/bin/lstm-export bench --check-alone --json "$out.json" --plot "$out.png" --markdown "$out.md" ${TARGET:+--target "$TARGET"} "$@"
