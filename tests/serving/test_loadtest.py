"""A small bounded load test against a real server process on loopback."""
import torch

from lstm_export.charlm import CharLM
from lstm_export.config import ModelConfig
from lstm_export.export import export_onnx
from lstm_export.serving.loadtest import ServerProcess, run_clients


def test_concurrent_clients_get_their_own_streams_back(tmp_path):
    torch.manual_seed(0)
    path = export_onnx(CharLM(ModelConfig(vocab_size=20, embed=8, hidden=16, layers=2)).eval(),
                       tmp_path / "lm.onnx", "streaming")
    key = tmp_path / "key"
    key.write_bytes(b"a-state-key-of-24-bytes!")
    with ServerProcess(path, "--max-wait-ms", "5", "--state-key-file", str(key)) as server:
        for protocol in ("v1", "v2"):  # v2: sequences continued by their state tokens
            res = run_clients(server.url, path, clients=6, chunks=5, chunk_len=4, vocab_size=20, protocol=protocol,
                              model_name="lm")
            assert res.requests == 30 and res.errors == 0 and res.mismatches == 0, res
            assert res.p99_ms >= res.p50_ms > 0
