"""The load test against real server processes on loopback: every stream's answers are checked against
the stream run alone on ONNX Runtime, over JSON and binary tensors, for serve and the bare endpoint."""
import json

import pytest
import torch

from lstm_export.charlm import CharLM
from lstm_export.config import ModelConfig
from lstm_export.export import export_onnx
from lstm_export.serving.load_report import LoadReport
from lstm_export.serving.loadtest import LoadResult, ServerProcess, Workload, measure


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    torch.manual_seed(0)
    return export_onnx(CharLM(ModelConfig(vocab_size=20, embed=8, hidden=16, layers=2)).eval(),
                       tmp_path_factory.mktemp("load") / "lm.onnx", "streaming")


def test_concurrent_clients_get_their_own_streams_back(lm, tmp_path):
    key = tmp_path / "key"
    key.write_bytes(b"a-state-key-of-24-bytes!")
    work = Workload(clients=6, chunks=25, chunk_len=4, vocab_size=20)  # 150 requests: /proc counts CPU in 10 ms ticks
    with ServerProcess(lm, "--max-wait-ms", "5") as server:
        for protocol, tensors in (("v1", "json"), ("v2", "json"), ("v2", "binary")):
            res = measure(server, lm, work, tensors, protocol, model_name="lm")
            assert res.requests == 150 and res.errors == 0 and res.mismatches == 0, res
            assert res.p99_ms >= res.p50_ms > 0 and res.server_cpu_ms > 0 and res.rows_per_run >= 1, res
    with ServerProcess(lm, "--state-key-file", str(key)) as server:  # sequences continued by their state tokens
        res = measure(server, lm, work, "binary", model_name="lm")
        assert res.requests == 150 and res.errors == 0 and res.mismatches == 0, res


def test_the_bare_baseline_answers_json_and_binary_right(lm):
    with ServerProcess(lm, "--name", "lm", bare=True) as bare:
        for tensors in ("json", "binary"):
            res = measure(bare, lm, Workload(clients=3, chunks=4, vocab_size=20), tensors, model_name="lm")
            assert res.requests == 12 and res.errors == 0 and res.mismatches == 0, res
            assert res.rows_per_run is None  # no /metrics: no rows per run to claim


def _row(server, tensors, clients, rps, p50):
    return LoadResult(server, tensors, clients, 100, 0, 0, 1.0, rps, p50, 2 * p50, 0.5)


def test_report_medians_goals_and_files(tmp_path):
    rep = LoadReport("a CPU", "cmd", "a model")
    rep.rounds = [[_row("serve", "json", 1, 900, p), _row("bare", "json", 1, 1000, 0.8),
                   _row("serve", "json", 8, 2600, 3.0), _row("bare", "json", 8, rb, 4.0)]
                  for p, rb in ((0.85, 2000), (0.95, 1900), (0.90, 2100))]
    rows = {(r.server, r.clients): r for r in rep.rows()}
    assert rows["serve", 1].p50_ms == 0.9 and rows["bare", 8].requests_per_s == 2000
    assert rows["serve", 1].requests == 300
    goals = {(g.peer, g.clients): g for g in rep.goals()}
    assert goals["bare", 1].ratio == pytest.approx(0.9 / 0.8, abs=1e-3) and not goals["bare", 1].met  # > 1.1x
    assert goals["bare", 8].ratio == 1.3 and goals["bare", 8].met
    assert ("triton", 1) not in goals  # no Triton row, no Triton goal
    rep.write(tmp_path / "r")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [g["met"] for g in saved["goals"]] == [False, True] and len(saved["rounds"]) == 3
    assert "NOT met" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
