#!/usr/bin/env bash
# GPU benchmark in two halves (a GPU machine may have no TVM compiler):
#   here:        ./scripts/bench_gpu.sh prepare DIR        (exports and compiles the CUDA artifacts)
#   on the GPU:  ./scripts/bench_gpu.sh run DIR            (-> benchmarks/bench_gpu.{json,md})
# The GPU side needs torch and TVM's runtime only (TVM_USE_RUNTIME_LIB=1; see lstm_export/harness/gpu_bench.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
case "${1:-}" in
  prepare) "$PY" -m lstm_export.harness.gpu_bench prepare "${2:?DIR}" ;;
  run) "$PY" -m lstm_export.harness.gpu_bench run "${2:?DIR}" --json benchmarks/bench_gpu.json --markdown benchmarks/bench_gpu.md ;;
  *) echo "usage: $0 prepare DIR | run DIR" >&2; exit 2 ;;
esac
