"""Bounded loopback load test of `lstm-export serve` -> benchmarks/serve_load.{json,md}.

Usage: .venv/bin/python scripts/load_test.py [CLIENT_COUNTS...]   (default 1 2 4 8 16)
"""
import sys
import tempfile
from pathlib import Path

import torch

from common.machine import cpu_name
from lstm_export.charlm import CharLM
from lstm_export.config import ModelConfig
from lstm_export.export import export_onnx
from serving.loadtest import ServerProcess, run_clients, write_report

if __name__ == "__main__":
    counts = [int(a) for a in sys.argv[1:]] or [1, 2, 4, 8, 16]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, embed=64, hidden=256, layers=2)
    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(CharLM(cfg).eval(), Path(d) / "lm.streaming.onnx", "streaming")
        with ServerProcess(path, "--max-batch", "16", "--max-wait-ms", "2") as server:
            rows = [run_clients(server.url, path, n, chunks=20, chunk_len=8) for n in counts]
    print(write_report(rows, "benchmarks/serve_load", cpu_name(), ".venv/bin/python scripts/load_test.py",
                       "char LM 2x256, vocab 64, streaming graph on ort-cpu; chunks of 8 tokens, 20 per client"))
