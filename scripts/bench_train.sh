#!/usr/bin/env bash
# Quality benchmark: the char-base model (2 layers) on tinyshakespeare for at most 20 minutes;
# writes benchmarks/train_charlm_shakespeare_<cpu>.{json,png}. Goal: validation loss <= 1.60 nats/char.
# LSTM_EXPORT_NATIVE=0 ./scripts/bench_train.sh trains on the autograd path instead of the native kernel
# (the files then end in -autograd).
set -euo pipefail
cd "$(dirname "$0")/.."
TEXT=${TEXT:-../shared/data/tinyshakespeare.txt}
OUT=${OUT:-runs/tinyshakespeare}
[ -f "$TEXT" ] || { echo "bench_train: corpus $TEXT not found; set TEXT=PATH" >&2; exit 2; }
rm -rf "$OUT"; mkdir -p "$(dirname "$OUT")"
name=$(.venv/bin/python -c 'from lstm_export.harness.bench_report import machine_slug; print(machine_slug())')
[ "${LSTM_EXPORT_NATIVE:-1}" = 0 ] && name="$name-autograd"
CMD=".venv/bin/lstm-export train --config char-base --text $TEXT --out $OUT"
# not a terminal: train prints one line per evaluation (step, losses, chars/s, seconds)
$CMD 2>&1 | tee "$OUT.log"
.venv/bin/python -m lstm_export.report "$OUT/ckpt.pt" "benchmarks/train_charlm_shakespeare_$name" "$CMD"
