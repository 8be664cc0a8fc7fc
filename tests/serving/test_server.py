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

from lstm_export.serving.server import ServerConfig, create_app  # noqa: E402

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


BAD_GENERATE = [
    ({"prime": "ab", "seed": "abc"}, "'seed'"), ({"prime": "ab", "seed": -1}, "'seed'"),
    ({"prime": "ab", "seed": 1.5}, "'seed'"), ({"prime": "ab", "seed": 2**70}, "'seed'"),
    ({"prime": "ab", "temperature": "hot"}, "'temperature'"), ({"prime": "ab", "temperature": -1}, "'temperature'"),
    ({"prime": "ab", "chars": True}, "'chars'"), ({"prime": "ab", "chars": 5.0}, "'chars'"),
    ({"prime": 7}, "'prime'"), ({"prime": "ab", "surprise": 1}, "'surprise'"),
]


@pytest.mark.parametrize("body,field", BAD_GENERATE)
def test_generate_bodies_are_checked_against_a_schema(client, body, field):
    r = client.post("/v1/generate", json=body)
    _err(r, 400, "bad_request")
    assert field in r.json()["error"]["message"]


@pytest.mark.parametrize("raw,why", [
    (b'{"prime": "ab", "temperature": NaN}', "NaN is not a JSON value"),
    (b'{"prime": "ab", "temperature": Infinity}', "Infinity is not a JSON value"),
    (b"[" * 100_000, "nests deeper than"),
    (b'{"prime": "ab", "seed": ' + b"9" * 5000 + b"}", "not valid JSON"),
])
def test_json_that_python_would_accept_or_choke_on_is_a_400(lm_path, raw, why):
    with TestClient(create_app(str(lm_path[1]), ServerConfig(max_body_bytes=10**6))) as client:
        r = client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
        _err(r, 400, "malformed_json")
        assert why in r.json()["error"]["message"]
        assert client.get("/healthz").status_code == 200  # and the server goes on


def test_a_bug_is_a_counted_json_500_and_metrics_stay_bounded(client, monkeypatch):
    session = client.app.state.session
    monkeypatch.setattr(session, "feed_text", lambda *a: 1 / 0)
    sid = client.post("/v1/streams").json()["stream_id"]
    r = client.post(f"/v1/streams/{sid}", json={"text": "ab"})
    _err(r, 500, "internal_error")
    assert "ZeroDivisionError" in r.json()["error"]["message"]
    for k in range(50):
        client.get(f"/no/such/path/{k}")
    m = client.get("/metrics").text
    assert 'lstm_requests_total{route="/v1/streams/{id}",status="500"} 1.0' in m
    assert 'route="other",status="404"} 50.0' in m and "/no/such" not in m


def test_health_answers_while_every_worker_thread_is_busy(client, monkeypatch):
    import threading
    import time
    gate = threading.Event()
    session = client.app.state.session
    real = session.feed_text
    monkeypatch.setattr(session, "feed_text", lambda *a: (gate.wait(10), real(*a))[1])
    sids = [client.post("/v1/streams").json()["stream_id"] for _ in range(3)]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(60) as pool:  # more blocked requests than the server has worker threads
        futures = [pool.submit(client.post, f"/v1/streams/{sids[k % 3]}", json={"text": "a"}) for k in range(50)]
        time.sleep(0.5)
        t0 = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        assert time.perf_counter() - t0 < 1.0
        gate.set()
        assert all(f.result().status_code in (200, 429) for f in futures)


def test_fuzzed_bodies_never_get_a_500(client):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
    json_values = st.recursive(scalars,
                               lambda inner: st.lists(inner, max_size=4)
                               | st.dictionaries(st.text(), inner, max_size=4),
                               max_leaves=12)
    bodies = st.dictionaries(st.sampled_from(["prime", "chars", "temperature", "seed", "text", "chunk", "x"]),
                             json_values, max_size=4)
    sid = client.post("/v1/streams").json()["stream_id"]

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, route=st.sampled_from(["/v1/generate", f"/v1/streams/{sid}"]))
    def post(body, route):
        r = client.post(route, json=body)
        assert r.status_code in (200, 400, 404, 413, 429), (body, r.text)
        assert r.headers["content-type"].startswith("application/json")

    post()


def test_serve_refuses_a_port_in_use_in_one_line(cli_here, lm_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = cli_here("serve", lm_path[1], "--port", s.getsockname()[1])
    assert r.returncode == 2 and "cannot listen on 127.0.0.1:" in r.stderr and len(r.stderr.splitlines()) == 1
