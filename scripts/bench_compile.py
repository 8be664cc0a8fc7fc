"""Compile time and model.so size against sequence length, unrolled vs native -> benchmarks/compile_vs_seqlen.*"""
import sys

from lstm_export.common.machine import cpu_name
from lstm_export.harness.compile_scaling import compile_scaling, write_table

if __name__ == "__main__":
    rows = compile_scaling(cap_s=float(sys.argv[1]) if len(sys.argv) > 1 else 600.0)
    command = " ".join([".venv/bin/python scripts/bench_compile.py", *sys.argv[1:]])
    print(write_table(rows, "benchmarks/compile_vs_seqlen", cpu_name(), command))
