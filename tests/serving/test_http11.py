"""serve's HTTP/1.1 protocol (serving/http11.py) on a real socket: keep-alive, pipelining in order,
chunked bodies, Expect: 100-continue, HTTP/1.0 and Connection: close, idle connections closed, and
every limit (413, 408, 400) a clean answer that closes the connection while the server goes on. The
numbers are checked against the model run in-process."""
from __future__ import annotations

import contextlib
import json
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

pytest.importorskip("httptools", reason="httptools is not installed")
from lstm_export.serving.http11 import protocol_for  # noqa: E402
from lstm_export.serving.server import ServerConfig, create_app  # noqa: E402

VOCAB = "abcdefghij .\n"
INFER = "/v2/models/lm/infer"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    torch.manual_seed(0)
    m = CharLM(ModelConfig(vocab_size=len(VOCAB), embed=6, hidden=16, layers=2), Vocab(VOCAB)).eval()
    return m, export_onnx(m, tmp_path_factory.mktemp("h11") / "lm.onnx", "streaming")


@contextlib.contextmanager
def running(app, **config):
    """`app` as `serve` runs it (uvicorn's server, this protocol) on a free loopback port, in a
    thread; yields the port."""
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", http=protocol_for(app), **config))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        t.join(timeout=10)


@pytest.fixture(scope="module")
def port(lm):
    app = create_app(str(lm[1]), ServerConfig(max_body_bytes=4000, body_timeout_s=0.5, max_chunk=64), name="lm")
    with running(app, timeout_keep_alive=1) as p:
        yield p


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def _infer_body(ids, seq=None, start=False, end=False) -> bytes:
    body = {"inputs": [{"name": "tokens", "shape": [1, len(ids)], "datatype": "INT64", "data": ids}]}
    if seq is not None:
        body["parameters"] = {"sequence_id": seq, "sequence_start": start, "sequence_end": end}
    return json.dumps(body).encode()


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body


def _responses(sock, n: int, timeout: float = 5.0) -> list[tuple[int, dict, bytes]]:
    """n responses read off the socket: (status, headers, body), by their content-length."""
    sock.settimeout(timeout)
    buf, out = b"", []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} responses: {buf[:200]!r}")
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        if status == 100:
            out.append((100, headers, b""))
            continue
        size = int(headers["content-length"])
        while len(buf) < size:
            buf += sock.recv(65536)
        out.append((status, headers, buf[:size]))
        buf = buf[size:]
    return out


def _closed(sock, timeout: float = 3.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, socket.timeout):
        return False


def test_keep_alive_and_pipelined_requests_are_answered_in_order(port, lm):
    want = _logits(lm[0], [1, 2, 3, 4, 5])  # first: the connection is closed after 1 s idle
    with socket.create_connection(("127.0.0.1", port)) as s:
        # three requests in one write: a sequence's start, a route of the ASGI app, its continuation
        ready = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
        s.sendall(_post(INFER, _infer_body([1, 2, 3], 7, start=True)) + ready
                  + _post(INFER, _infer_body([4, 5], 7, end=True)))
        (a, ha, ba), (b, _, bb), (c, _, bc) = _responses(s, 3)
        assert (a, b, c) == (200, 200, 200) and json.loads(bb) == {"ready": True}
        s.sendall(_post(INFER, _infer_body([1])))  # the connection is still open
        assert _responses(s, 1)[0][0] == 200
        first, second = (json.loads(x)["outputs"][0] for x in (ba, bc))
        np.testing.assert_allclose(np.array(first["data"]).reshape(first["shape"]), want[:, :3], atol=1e-5)
        np.testing.assert_allclose(np.array(second["data"]).reshape(second["shape"]), want[:, 3:], atol=1e-5)
        assert "connection" not in ha and ha["content-type"] == "application/json" and "date" in ha


def test_chunked_bodies_and_expect_continue(port, lm):
    body, want = _infer_body([3, 1, 4]), _logits(lm[0], [3, 1, 4])  # before connecting: 1 s idle closes it
    with socket.create_connection(("127.0.0.1", port)) as s:
        parts = [body[:10], body[10:]]
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunked)
        status, _, data = _responses(s, 1)[0]
        out = json.loads(data)["outputs"][0]
        assert status == 200
        np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), want, atol=1e-5)
        s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
                  .encode())
        assert _responses(s, 1)[0][0] == 100  # the server asks for the body before it comes
        s.sendall(body)
        assert _responses(s, 1)[0][0] == 200


@pytest.mark.parametrize("request_bytes, status, shape", [
    (_post(INFER, b"x" * 5000), 413, "v2"),  # declared too long: refused before reading it
    (_post("/v1/generate", b"x" * 5000), 413, "v1"),
    (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1400\r\n".encode() + b"x" * 5120,
     413, "v2"),  # too long as it arrives
    (b"NOT HTTP AT ALL\r\n\r\n", 400, "v1"),
])
def test_limits_answer_in_the_routes_error_shape_and_close(port, request_bytes, status, shape):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(request_bytes)
        got, headers, data = _responses(s, 1)[0]
        assert got == status and headers["connection"] == "close", (got, headers, data)
        error = json.loads(data)["error"]
        assert isinstance(error, str) if shape == "v2" else set(error) == {"code", "message"}
        assert _closed(s)
    with socket.create_connection(("127.0.0.1", port)) as s:  # and the server goes on
        s.sendall(_post(INFER, _infer_body([1])))
        assert _responses(s, 1)[0][0] == 200


def test_slow_vanishing_and_idle_clients(port):
    with socket.create_connection(("127.0.0.1", port)) as slow:  # half a body, then nothing: 408
        slow.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"inputs\"".encode())
        t0 = time.monotonic()
        status, headers, data = _responses(slow, 1)[0]
        assert status == 408 and "0.5 s" in json.loads(data)["error"] and 0.4 < time.monotonic() - t0 < 2.0
        assert _closed(slow)
    gone = socket.create_connection(("127.0.0.1", port))  # hangs up mid-body
    gone.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{{".encode())
    gone.close()
    with socket.create_connection(("127.0.0.1", port)) as idle:  # keep-alive: closed after 1 s idle
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _responses(idle, 1)[0][0] == 200
        t0 = time.monotonic()
        assert _closed(idle, timeout=5.0) and time.monotonic() - t0 < 3.0
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _responses(s, 1)[0][0] == 200


@pytest.mark.parametrize("request_bytes", [
    _post(INFER, _infer_body([1, 2])).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    _post(INFER, _infer_body([1, 2]), "Connection: close\r\n"),
    b"HEAD /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
])
def test_http_1_0_and_connection_close_end_the_connection(port, request_bytes):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(request_bytes)
        s.settimeout(5)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
        head, body = raw.split(b"\r\n\r\n", 1)
        assert b"connection: close" in head.lower()
        if request_bytes.startswith(b"HEAD"):  # the app's answer (FastAPI: 405 on a GET route) without its body
            assert head.startswith(b"HTTP/1.1 405") and body == b"" and b"content-length: 53" in head.lower()
        else:
            assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["outputs"][0]["name"] == "logits"


def test_a_bug_on_the_hot_path_is_a_counted_json_500(lm, monkeypatch):
    app = create_app(str(lm[1]), ServerConfig(), name="lm")
    with running(app) as free:
        monkeypatch.setattr(app.state.session.runtime, "run_checked", lambda feeds: 1 / 0)  # fails in the batch
        with socket.create_connection(("127.0.0.1", free)) as s:
            s.sendall(_post(INFER, _infer_body([1])))
            status, _, data = _responses(s, 1)[0]
            assert status == 500 and "ZeroDivisionError" in json.loads(data)["error"]
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            metrics = _responses(s, 1)[0][2].decode()
        assert 'lstm_requests_total{route="/v2/models/{name}/infer",status="500"} 1.0' in metrics


def test_serve_stops_cleanly_on_sigterm_and_sigint(cli_here, lm, tmp_path):
    import signal
    import subprocess
    import sys
    for sig in (signal.SIGTERM, signal.SIGINT):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "lstm_export.cli", "serve", str(lm[1]), "--port", str(free),
                                 "--name", "lm"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", free), timeout=1) as s:
                        s.sendall(_post(INFER, _infer_body([1, 2])))
                        assert _responses(s, 1)[0][0] == 200
                        break
                except OSError:
                    time.sleep(0.2)
            proc.send_signal(sig)
            # uvicorn shuts down gracefully, then re-raises SIGTERM so that a supervisor sees it
            code, err = proc.wait(15), proc.stderr.read()
            assert code == (-sig if sig == signal.SIGTERM else 0) and "Traceback" not in err, (code, err)
        finally:
            proc.kill()


def test_generated_bodies_through_the_socket_never_500_and_pass_only_when_they_match(lm):
    """The strict-body property of test_v2_strict, through this protocol on a real socket."""
    import http.client

    from hypothesis import HealthCheck, given, settings

    from tests.serving.test_v2_strict import BODIES, MAX_CHUNK, valid
    app = create_app(str(lm[1]), ServerConfig(max_streams=8, max_chunk=MAX_CHUNK), name="lm")

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=BODIES)
    def post(body):
        conn.request("POST", INFER, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        assert r.status < 500, (body, data)
        want = valid(body)
        if want is not None:
            assert (r.status == 200) == want, (body, r.status, data)
        if r.status != 200:
            assert isinstance(json.loads(data).get("error"), str), data

    with running(app) as free:
        conn = http.client.HTTPConnection("127.0.0.1", free, timeout=10)
        post()
        conn.close()


def test_a_long_chunk_runs_on_the_batcher_thread_and_is_answered(port, lm):
    """Past INLINE_STEPS the batch runs off the event loop; its answer comes back through the loop."""
    from lstm_export.serving.streaming import INLINE_STEPS
    ids = [int(i) for i in np.random.default_rng(8).integers(0, len(VOCAB), INLINE_STEPS + 8)]
    want = _logits(lm[0], ids)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(_post(INFER, _infer_body(ids, "long", start=True, end=True)))
        status, _, data = _responses(s, 1)[0]
    out = json.loads(data)["outputs"][0]
    assert status == 200
    np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), want, atol=1e-5)


def test_random_load_with_vanishing_clients_leaves_no_error_and_no_stream_behind(lm):
    """8 clients for 3 s: pipelined sequences over 20 shared sequence ids (restarted by each other),
    some clients hanging up mid-request or without reading. Never a 5xx, nothing logged, and
    afterwards at most one stream per sequence id is open and a new request is served."""
    import logging
    import random
    app = create_app(str(lm[1]), ServerConfig(max_streams=64, max_chunk=64), name="lm")
    failures, logged = [], []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("lstm_export.serve").addHandler(handler)

    def client(k, port, stop):
        rng = random.Random(k)
        while time.monotonic() < stop:
            seq = rng.randint(1, 20)
            reqs = [_post(INFER, _infer_body([rng.randrange(len(VOCAB)) for _ in range(rng.randint(1, 40))], seq,
                                             start=True))]
            reqs += [_post(INFER, _infer_body([rng.randrange(len(VOCAB))], seq)) for _ in range(rng.randint(0, 4))]
            data = b"".join(reqs)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    mode = rng.random()
                    s.sendall(data[:rng.randint(1, len(data))] if mode < 0.2 else data)
                    if mode < 0.3:
                        continue  # gone mid-request, or without reading the answers
                    failures.extend(st for st, _, _ in _responses(s, len(reqs)) if st >= 500)
            except OSError as e:
                failures.append(repr(e))

    try:
        with running(app) as port:
            stop = time.monotonic() + 3
            threads = [threading.Thread(target=client, args=(k, port, stop)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(0.2)  # the answers to the vanished clients' last requests
            assert not failures and not logged, (failures[:3], logged[:3])
            assert app.state.session.open_streams <= 20, app.state.session.open_streams
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(_post(INFER, _infer_body([1, 2])))
                assert _responses(s, 1)[0][0] == 200
    finally:
        logging.getLogger("lstm_export.serve").removeHandler(handler)
