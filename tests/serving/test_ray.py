"""Scale-out on Ray Serve: a local Ray instance with 2 replicas of the app; one stream's requests
spread over both replicas by Ray's router, continued by their state tokens, give the logits of one
process bit for bit."""
import os
import socket
import time

import numpy as np
import pytest
import torch

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -e '.[ray]')")
httpx = pytest.importorskip("httpx")

from lstm_export.charlm import CharLM  # noqa: E402
from lstm_export.config import ModelConfig  # noqa: E402
from lstm_export.data import Vocab  # noqa: E402
from lstm_export.export import export_onnx  # noqa: E402
from lstm_export.runtimes.source import open_model  # noqa: E402
from lstm_export.serving import ray_serve  # noqa: E402
from lstm_export.serving.server import ServerConfig  # noqa: E402
from lstm_export.serving.streaming import StreamingSession  # noqa: E402

VOCAB = "abcdefghij .\n"
KEY = b"ray-test-key-0123456789"


@pytest.mark.slow
def test_two_replicas_continue_one_stream_by_its_token(tmp_path):
    torch.manual_seed(0)
    lm = CharLM(ModelConfig(vocab_size=len(VOCAB), embed=6, hidden=16, layers=2), Vocab(VOCAB)).eval()
    path = export_onnx(lm, tmp_path / "lm.streaming.onnx", "streaming")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, len(VOCAB), rng.integers(1, 6)).tolist() for _ in range(24)]
    with StreamingSession(path) as one:  # one process: the reference
        sid = one.open()
        want = [one.feed(sid, np.array(c))["logits"] for c in chunks]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray_serve.run(open_model(path), ServerConfig(), "lm", KEY, 2, "127.0.0.1", port, blocking=False)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):  # the proxy answers once both replicas are up
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        token, served = None, set()
        for k, c in enumerate(chunks):
            params = {"sequence_id": "s", "sequence_start": k == 0, **({"state_token": token} if token else {})}
            r = httpx.post(f"{base}/v2/models/lm/infer", timeout=30, json={
                "inputs": [{"name": "tokens", "shape": [1, len(c)], "datatype": "INT64", "data": c}],
                "parameters": params})
            assert r.status_code == 200, r.text
            served.add(r.headers["x-served-by"])
            got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(want[k].shape)
            assert np.array_equal(got, want[k]), f"chunk {k}: {np.abs(got - want[k]).max()}"
            token = r.json()["parameters"]["state_token"]
        assert len(served) == 2, f"every request went to {served}: Ray's router did not spread them"
    finally:
        ray_serve.shutdown()
