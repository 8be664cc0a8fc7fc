#!/usr/bin/env bash
# Creates .venv/ in the repo and installs lstm-export for CPU work. Idempotent: a second run only
# re-checks. torch is pinned to the 2.13.0 CPU build first, so nothing later can pull CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# pip's own status survives the filter (pipefail); the filter drops this machine's noise about
# configured local indexes that do not exist.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

# CPU torch first: with 2.13.0 installed, later requirements that admit it install nothing more.
if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU build)"
  quiet "${PIP[@]}" "torch==2.13.0"
fi

echo "setup: installing lstm-export and its CPU dependencies"
quiet "${PIP[@]}" -e ".[dev]"
# LSTM models other people exported, for the fidelity tests (tests/runtimes/test_real_models.py):
# these packages ship .onnx files; --no-deps takes the files without their runtimes (silero-vad
# would pull torchaudio, ddddocr opencv). Nothing downloads a model at run time.
if ! .venv/bin/python -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(p) for p in ("silero_vad", "faster_whisper", "ddddocr")))' 2>/dev/null; then
  echo "setup: installing the packages whose ONNX models the fidelity tests run"
  quiet "${PIP[@]}" --no-deps "silero-vad==6.2.3" "faster-whisper==1.2.1" "ddddocr==1.6.1"
fi
echo "setup: done; try .venv/bin/lstm-export --help"
