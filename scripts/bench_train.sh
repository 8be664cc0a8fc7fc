#!/usr/bin/env bash
# Quality benchmark: the char-base model (2 layers) on tinyshakespeare for at most 20 minutes;
# writes benchmarks/train_charlm_shakespeare.{json,png}. Goal: validation loss <= 1.60 nats/char.
set -euo pipefail
cd "$(dirname "$0")/.."
TEXT=${TEXT:-../shared/data/tinyshakespeare.txt}
OUT=${OUT:-runs/tinyshakespeare}
[ -f "$TEXT" ] || { echo "bench_train: corpus $TEXT not found; set TEXT=PATH" >&2; exit 2; }
rm -rf "$OUT"; mkdir -p "$(dirname "$OUT")"
CMD=".venv/bin/lstm-export train --config char-base --text $TEXT --out $OUT"
$CMD 2>&1 | tee "$OUT.log" | tr '\r' '\n' | grep -v '^train:' || true
.venv/bin/python -m lstm_export.report "$OUT/ckpt.pt" benchmarks/train_charlm_shakespeare "$CMD"
