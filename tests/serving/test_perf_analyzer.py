"""Triton's own load tool drives `serve` as it drives Triton: perf_analyzer over HTTP (binary and JSON
tensors), gRPC and gRPC --streaming, with sequences (--sequence-length), reading the model
configuration first. Skipped where scripts/perf_analyzer.sh has not made it runnable (it fetches two
wheels; a test downloads nothing)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

from lstm_export.serving.loadtest import free_port  # noqa: E402
from lstm_export.serving.server import ServerConfig, create_app  # noqa: E402

from .test_oip import serving, small_lm  # noqa: E402

WRAPPER = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lstm-export/perf_analyzer/perf_analyzer"
HOME_WRAPPER = Path.home() / ".cache/lstm-export/perf_analyzer/perf_analyzer"  # the suite moves XDG_CACHE_HOME


def _perf_analyzer() -> Path | None:
    for w in (WRAPPER, HOME_WRAPPER):
        if w.is_file() and os.access(w, os.X_OK):
            return w
    return None


@pytest.fixture(scope="module")
def addresses(tmp_path_factory):
    grpc_port = free_port()
    _, path = small_lm(tmp_path_factory.mktemp("pa"))
    app = create_app(str(path), ServerConfig(max_streams=64, max_chunk=64), name="lm",
                     grpc_address=f"127.0.0.1:{grpc_port}")
    with serving(app) as http:
        yield http, f"127.0.0.1:{grpc_port}"


@pytest.mark.parametrize("mode", ["http", "http-json", "grpc", "grpc-streaming"])
def test_perf_analyzer_drives_serve(addresses, tmp_path, mode):
    pa = _perf_analyzer()
    if pa is None:
        pytest.skip("perf_analyzer is not set up here: run ./scripts/perf_analyzer.sh once")
    data = tmp_path / "tokens.json"  # its random INT64 inputs would be ids outside the vocabulary
    data.write_text(json.dumps({"data": [{"tokens": {"content": [1, 2, 3, 4], "shape": [4]}}]}))
    flags = {"http": ["-i", "http"], "http-json": ["-i", "http", "--input-tensor-format", "json",
                                                      "--output-tensor-format", "json"],
             "grpc": ["-i", "grpc"], "grpc-streaming": ["-i", "grpc", "--streaming"]}[mode]
    url = addresses[0] if mode.startswith("http") else addresses[1]
    r = subprocess.run([str(pa), "-m", "lm", "-u", url, *flags, "--input-data", str(data), "--sequence-length", "4",
                        "--concurrency-range", "1", "--measurement-mode", "count_windows",
                        "--measurement-request-count", "40", "--stability-percentage", "999", "--max-trials", "3"],
                       capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Throughput:" in out and "error" not in out.lower(), out[-2000:]
