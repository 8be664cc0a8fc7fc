#!/usr/bin/env bash
# CPU speed benchmark: every runtime on the benchmark shapes -> benchmarks/bench_cpu.{json,png,md}.
# OpenVINO is an optional peer: install it with .venv/bin/pip install -e '.[peers]'.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks
.venv/bin/lstm-export bench --json benchmarks/bench_cpu.json --plot benchmarks/bench_cpu.png \
    --markdown benchmarks/bench_cpu.md "$@"
