"""Compile time and artifact size against sequence length, unrolled vs native (the loop stays a loop)."""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class ScalingRow:
    mode: str
    seq_len: int
    compile_s: float | None  # None: stopped at the cap (see `stopped_after_s`)
    artifact_mb: float | None
    onnx_nodes: int
    stopped_after_s: float | None = None


def compile_scaling(seq_lens=(16, 64, 256, 1024), input_size: int = 64, hidden: int = 128, layers: int = 1,
                    cap_s: float = 600.0, progress: bool = True) -> list[ScalingRow]:
    """Exports one LSTM at each fixed length in both modes and compiles each for llvm in a subprocess,
    stopped after `cap_s` seconds (later, longer lengths of that mode are then not attempted)."""
    import subprocess
    import sys

    import onnx
    from tqdm import tqdm

    from lstm_export import LSTM
    from lstm_export.export import export_onnx
    model = LSTM(input_size, hidden, layers).eval()
    rows, stopped = [], {}
    jobs = [(mode, T) for mode in ("native", "unrolled") for T in seq_lens]
    for mode, T in tqdm(jobs, disable=not progress, desc="compile", unit="model"):
        with tempfile.TemporaryDirectory() as d:
            path = export_onnx(model, Path(d) / "m.onnx", mode, seq_len=T, batch_size=1)
            nodes = len(onnx.load(str(path)).graph.node)
            if mode in stopped:
                rows.append(ScalingRow(mode, T, None, None, nodes, stopped[mode]))
                continue
            code = ("import sys, time; from lstm_export.runtimes.tvm_lstm import compile_onnx; "
                    "t = time.perf_counter(); "
                    "lib = compile_onnx(sys.argv[1], sys.argv[2], target='llvm'); "
                    "print(time.perf_counter() - t, lib.stat().st_size)")
            try:
                r = subprocess.run([sys.executable, "-c", code, str(path), str(Path(d) / "out")], capture_output=True,
                                   text=True, timeout=cap_s, check=True)
            except subprocess.TimeoutExpired:
                stopped[mode] = cap_s
                rows.append(ScalingRow(mode, T, None, None, nodes, cap_s))
                continue
            dt, size = r.stdout.split()[-2:]
            rows.append(ScalingRow(mode, T, round(float(dt), 2), round(int(size) / 1e6, 3), nodes))
    return rows


def write_table(rows: list[ScalingRow], prefix: str | Path, machine: str, command: str) -> str:
    """PREFIX.json and PREFIX.md; returns the markdown table."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps({"machine": machine, "command": command,
                                                       "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    lines = ["| mode | seq len | ONNX nodes | compile (s) | model.so (MB) |", "|---|---|---|---|---|"]
    for r in rows:
        c = f"{r.compile_s:.1f}" if r.compile_s is not None else f"> {r.stopped_after_s:.0f} (stopped)"
        a = f"{r.artifact_mb:.2f}" if r.artifact_mb is not None else "-"
        lines.append(f"| {r.mode} | {r.seq_len} | {r.onnx_nodes} | {c} | {a} |")
    table = "\n".join(lines)
    prefix.with_suffix(".md").write_text(f"Compile time and artifact size against sequence length\n\n"
                                         f"Machine: {machine}. Command: `{command}`.\n\n{table}\n")
    return table
