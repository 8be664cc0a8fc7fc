"""The HTTP server: every route, every limit as a clean 4xx, and the server keeps serving after faults."""
import socket
import threading
import time

import numpy as np
import pytest
import torch

from lstm_export.charlm import CharLM
from lstm_export.config import ModelConfig
from lstm_export.data import Vocab
from lstm_export.export import export_onnx

pytest.importorskip("fastapi", reason="fastapi is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from serving.server import ServerConfig, create_app  # noqa: E402

VOCAB = "abcdefghij .\n"


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory):
    torch.manual_seed(0)
    lm = CharLM(ModelConfig(vocab_size=len(VOCAB), embed=6, hidden=16, layers=2), Vocab(VOCAB)).eval()
    return lm, export_onnx(lm, tmp_path_factory.mktemp("srv") / "lm.streaming.onnx", "streaming")


@pytest.fixture()
def client(lm_path):
    cfg = ServerConfig(max_streams=3, max_chunk=16, max_body_bytes=2000, body_timeout_s=1.0, max_generate=50)
    with TestClient(create_app(str(lm_path[1]), cfg)) as c:
        yield c


def _err(r, status, code):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["error"]["code"] == code, r.json()


def test_model_health_and_metrics(client):
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/v1/model").json()
    assert [i["name"] for i in info["inputs"]] == ["tokens", "h_0", "c_0"]
    assert info["vocab"] == VOCAB and info["metadata"]["lstm_export.config"]["mode"] == "streaming"
    sid = client.post("/v1/streams").json()["stream_id"]
    client.post(f"/v1/streams/{sid}", json={"text": "abc"})
    m = client.get("/metrics").text
    assert "lstm_open_streams 1.0" in m
    assert 'lstm_requests_total{route="/v1/streams/{id}",status="200"} 1.0' in m
    assert "lstm_request_seconds_bucket" in m and "lstm_batches_total" in m


def test_stream_feed_equals_torch_and_close(client, lm_path):
    lm = lm_path[0]
    sid = client.post("/v1/streams").json()["stream_id"]
    a = client.post(f"/v1/streams/{sid}", json={"text": "abc de"}).json()["outputs"]["logits"]
    b = client.post(f"/v1/streams/{sid}", json={"chunk": [1, 2, 3]}).json()["outputs"]["logits"]
    ids = [VOCAB.index(ch) for ch in "abc de"] + [1, 2, 3]
    with torch.no_grad():
        ref, _ = lm(torch.tensor([ids]))
    np.testing.assert_allclose(np.array(a + b), ref[0].numpy(), atol=1e-5)
    assert client.delete(f"/v1/streams/{sid}").status_code == 204
    _err(client.post(f"/v1/streams/{sid}", json={"chunk": [1]}), 404, "unknown_stream")
    _err(client.delete(f"/v1/streams/{sid}"), 404, "unknown_stream")


def test_generate(client):
    r = client.post("/v1/generate", json={"prime": "ab", "chars": 20, "temperature": 0.7, "seed": 3})
    assert r.status_code == 200, r.text
    text = r.json()["text"]
    assert text.startswith("ab") and len(text) == 22 and set(text) <= set(VOCAB)
    again = client.post("/v1/generate", json={"prime": "ab", "chars": 20, "temperature": 0.7, "seed": 3})
    assert again.json()["text"] == text
    _err(client.post("/v1/generate", json={"prime": "ab", "chars": 51}), 400, "bad_request")
    _err(client.post("/v1/generate", json={"prime": "XYZ", "chars": 5}), 400, "bad_request")
    _err(client.post("/v1/generate", json={"prime": "", "chars": 5}), 400, "bad_request")
    assert client.get("/healthz").json()["open_streams"] == 0  # generation's private streams are closed


def test_bad_requests_are_clean_4xx(client):
    sid = client.post("/v1/streams").json()["stream_id"]
    url = f"/v1/streams/{sid}"
    _err(client.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, "malformed_json")
    _err(client.post(url, json=[1, 2]), 400, "malformed_json")
    _err(client.post(url, json={"nothing": 1}), 400, "bad_request")
    _err(client.post(url, json={"chunk": [[1, 2], [3, 4]]}), 400, "bad_request")  # wrong rank
    _err(client.post(url, json={"chunk": [0.5, 1.5]}), 400, "bad_request")  # wrong dtype
    _err(client.post(url, json={"chunk": [99]}), 400, "bad_request")  # id out of range
    _err(client.post(url, json={"chunk": ["a", "b"]}), 400, "bad_request")
    _err(client.post(url, json={"chunk": list(range(10)) * 2}), 413, "too_large")  # chunk over max_chunk
    _err(client.post(url, json={"text": "zzz"}), 400, "bad_request")  # unknown characters
    _err(client.post(url, content=b"x" * 5000), 413, "body_too_large")
    client.post("/v1/streams"), client.post("/v1/streams")
    _err(client.post("/v1/streams"), 429, "too_many_streams")
    assert client.post(url, json={"text": "abc"}).status_code == 200  # still serving


def _serve(path, cfg):
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(str(path), cfg), log_level="error"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.02)
    return server, t, port


def test_slow_and_vanishing_clients_do_not_stop_the_server(lm_path):
    import httpx
    cfg = ServerConfig(body_timeout_s=0.5)
    server, t, port = _serve(lm_path[1], cfg)
    try:
        # a client that sends half a body and stalls: 408 after the deadline
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /v1/streams/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"chunk\"")
        slow.settimeout(5)
        assert b"408" in slow.recv(1000).split(b"\r\n")[0]
        slow.close()
        # a client that disconnects mid-request
        gone = socket.create_connection(("127.0.0.1", port))
        gone.sendall(b"POST /v1/streams HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
        gone.close()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            sid = c.post("/v1/streams").json()["stream_id"]
            assert c.post(f"/v1/streams/{sid}", json={"text": "abc"}).status_code == 200
            assert c.get("/healthz").status_code == 200
    finally:
        server.should_exit = True
        t.join(timeout=10)


def test_serve_cli_refuses_missing_or_non_onnx_model(cli, tmp_path):
    (tmp_path / "bad.onnx").write_text("nope")
    for p, msg in [(tmp_path / "missing.onnx", "does not exist"), (tmp_path / "bad.onnx", "not a valid ONNX model")]:
        r = cli("serve", p, "--port", "0")
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
