#!/usr/bin/env bash
# GRU and RNN speed benchmark: torch.nn.GRU / torch.nn.RNN (seed 0) exported by torch.onnx at the
# bench shapes (gru0: the GRU export with linear_before_reset set to 0, Keras' reset_after=False
# cell), each timed with `lstm-export bench MODEL` against every available runtime ->
# benchmarks/bench_model_{gru,rnn}_<shape>_<machine>.{json,md,png}.
# TARGET='llvm -mcpu=haswell' ./scripts/bench_gru.sh compiles tvm-llvm's artifact for AVX2 first (the
# peers keep this CPU's ISA) and names the files ..._build-avx2.
# OpenVINO is an optional peer: .venv/bin/pip install -e '.[peers]'.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
name=$(.venv/bin/python -c 'import sys; from lstm_export.harness.bench_report import machine_slug; print(machine_slug(sys.argv[1] or None))' "${TARGET:-}")
.venv/bin/python - "$work" <<'PY'
import sys, warnings
import onnx, torch
out = sys.argv[1]
# (kind, T, B, I, H): the LSTM bench's throughput and streaming shapes
for kind, T, B, I, H in (("gru", 50, 128, 20, 100), ("gru", 32, 1, 128, 256),
                         ("rnn", 50, 128, 20, 100), ("rnn", 32, 1, 128, 256)):
    torch.manual_seed(0)
    m = (torch.nn.GRU if kind == "gru" else torch.nn.RNN)(I, H).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(T, B, I),), f"{out}/{kind}_T{T}_B{B}.onnx", input_names=["x"],
                          output_names=["y", "h"], dynamo=False, opset_version=17)
    if kind == "gru":
        model = onnx.load(f"{out}/{kind}_T{T}_B{B}.onnx")
        for a in next(n for n in model.graph.node if n.op_type == "GRU").attribute:
            if a.name == "linear_before_reset":
                a.i = 0
        onnx.save(model, f"{out}/gru0_T{T}_B{B}.onnx")
PY
peers=ort-cpu,tvm-llvm
.venv/bin/python -c 'import openvino' 2>/dev/null && peers=$peers,openvino
for model in "$work"/*.onnx; do
    stem=$(basename "$model" .onnx)
    out=benchmarks/bench_model_${stem}_$name
    if [ -n "${TARGET:-}" ]; then  # bench the compiled folder: tvm-llvm loads its model.so, the peers its model.onnx
        .venv/bin/lstm-export compile "$model" --target "$TARGET" --out "$work/$stem"
        model=$work/$stem
    fi
    .venv/bin/lstm-export bench "$model" --runtimes "$peers" --min-s 1 --rounds 3 \
        --json "$out.json" --markdown "$out.md" --plot "$out.png" "$@"
done
