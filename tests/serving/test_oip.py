"""The Open Inference Protocol (v2) routes, driven by a client nobody here wrote: tritonclient's HTTP
client against the running server, its sequences equal to running the model in-process; state
tokens that any replica with the key continues, and that refuse every kind of tampering."""
from __future__ import annotations

import contextlib
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
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

from lstm_export.serving.server import ServerConfig, create_app  # noqa: E402

VOCAB = "abcdefghij .\n"
KEY = b"0123456789abcdef-test-key"


def small_lm(folder):
    """The served model of these tests (and test_grpc's): a 2-layer char LM, exported for streaming."""
    torch.manual_seed(0)
    m = CharLM(ModelConfig(vocab_size=len(VOCAB), embed=6, hidden=16, layers=2), Vocab(VOCAB)).eval()
    return m, export_onnx(m, folder / "lm.streaming.onnx", "streaming")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return small_lm(tmp_path_factory.mktemp("oip"))


@contextlib.contextmanager
def serving(app):
    """The app on a free loopback port, in a thread, as `serve` runs it (uvicorn's server with
    serving.http11's protocol); yields its host:port."""
    import uvicorn

    from lstm_export.serving.http11 import protocol_for
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           http=protocol_for(app)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def url(lm):
    with serving(create_app(str(lm[1]), ServerConfig(max_streams=8, max_chunk=64))) as u:
        yield u


def _expected(model, chunks):
    """The logits of each chunk, running our model in-process with the state carried."""
    out, state = [], None
    with torch.no_grad():
        for c in chunks:
            logits, state = model(torch.tensor([c]), state)
            out.append(logits.numpy())  # (1, T, V)
    return out


def _infer(client, chunk, binary=True, **kw):
    x = httpclient.InferInput("tokens", [1, len(chunk)], "INT64")
    x.set_data_from_numpy(np.array([chunk], np.int64), binary_data=binary)
    return client.infer("lm.streaming", [x], outputs=[httpclient.InferRequestedOutput("logits", binary_data=binary)],
                        **kw)


def test_tritonclient_health_metadata_and_a_sequence(url, lm):
    client = httpclient.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lm.streaming")
    meta = client.get_model_metadata("lm.streaming")
    assert meta["inputs"] == [{"name": "tokens", "datatype": "INT64", "shape": [-1, -1]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits"] and meta["outputs"][0]["shape"][-1] == len(VOCAB)
    chunks = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    want = _expected(lm[0], chunks)
    for k, (c, binary) in enumerate(zip(chunks, (True, False, True))):  # binary and JSON tensors alike
        r = _infer(client, c, binary, sequence_id=42, sequence_start=k == 0, sequence_end=k == len(chunks) - 1)
        got = r.as_numpy("logits")
        assert got.shape == want[k].shape
        np.testing.assert_allclose(got, want[k], rtol=1e-5, atol=1e-5)
    with pytest.raises(InferenceServerException, match="not started"):  # the sequence has ended
        _infer(client, [1], sequence_id=42)


def test_interleaved_sequences_are_batched_and_kept_apart(url, lm):
    client = httpclient.InferenceServerClient(url, concurrency=4)
    seqs = {7: [[1, 2], [3, 4], [5]], 8: [[9, 9], [0, 1], [2]], "s-9": [[3, 3], [4, 4], [6]]}
    want = {s: _expected(lm[0], cs) for s, cs in seqs.items()}
    for step in range(3):
        pending = {}
        for s, cs in seqs.items():
            x = httpclient.InferInput("tokens", [1, len(cs[step])], "INT64")
            x.set_data_from_numpy(np.array([cs[step]], np.int64))
            pending[s] = client.async_infer("lm.streaming", [x], sequence_id=s, sequence_start=step == 0,
                                            sequence_end=step == 2)
        for s, p in pending.items():
            np.testing.assert_allclose(p.get_result().as_numpy("logits"), want[s][step], rtol=1e-5, atol=1e-5)


def test_protocol_errors_are_json_4xx_and_the_server_stays_live(url):
    import httpx
    base = f"http://{url}"
    r = httpx.post(f"{base}/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404 and "lm.streaming" in r.json()["error"]
    bad = [({"inputs": [{"name": "tokens", "shape": [1, 2], "datatype": "STRING", "data": [1, 2]}]}, "datatype"),
           ({"inputs": [{"name": "tokens", "shape": [1, 3], "datatype": "INT64", "data": [1, 2]}]}, "holds 2 values"),
           ({"inputs": [{"name": "tokens", "shape": [2, 1], "datatype": "INT64", "data": [1, 2]}]}, "batch 1"),
           ({"inputs": [{"name": "tokens", "shape": [1, 1], "datatype": "INT64", "data": [99]}]}, "token ids"),
           ({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "INT64", "data": [1]}]}, "not this model's"),
           ({"inputs": [{"name": "tokens", "shape": [1, 1], "datatype": "INT64", "data": [1]}],
             "parameters": {"sequence_id": 5}}, "not started"),
           ({"inputs": [{"name": "tokens", "shape": [1, 1], "datatype": "INT64", "data": [1]}],
             "parameters": {"sequence_id": 5, "sequence_start": "yes"}}, "true or false"),
           ({"inputs": [{"name": "tokens", "shape": [1, 1], "datatype": "INT64", "data": [1]}],
             "outputs": [{"name": "h_n"}]}, "not this model's")]
    for body, words in bad:
        r = httpx.post(f"{base}/v2/models/lm.streaming/infer", json=body)
        assert r.status_code == 400 and words in r.json()["error"], (body, r.status_code, r.text)
    r = httpx.post(f"{base}/v2/models/lm.streaming/infer", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = httpx.post(f"{base}/v2/models/lm.streaming/infer", content=b"{}",
                   headers={"Inference-Header-Content-Length": "99"})
    assert r.status_code == 400 and "length" in r.json()["error"]
    assert httpx.get(f"{base}/v2/health/live").status_code == 200
    assert httpx.get(f"{base}/v2").json()["extensions"]


@pytest.fixture(scope="module")
def replicas(lm):
    """Two servers with the same key and model (the replicas of a deployment), and one with another key."""
    cfg = ServerConfig(max_streams=8, max_chunk=64)
    with serving(create_app(str(lm[1]), cfg, state_key=KEY)) as a, \
            serving(create_app(str(lm[1]), cfg, state_key=KEY)) as b, \
            serving(create_app(str(lm[1]), cfg, state_key=b"another-key-0123456789")) as other:
        yield a, b, other


def test_a_stream_alternates_between_replicas_with_its_state_token(replicas, lm):
    a, b, _ = replicas
    clients = [httpclient.InferenceServerClient(u) for u in (a, b)]
    chunks = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 0]]
    want = _expected(lm[0], chunks)
    token = None
    for k, c in enumerate(chunks):
        r = _infer(clients[k % 2], c, sequence_id="user-1", sequence_start=k == 0,
                   parameters={"state_token": token} if token else None)
        np.testing.assert_allclose(r.as_numpy("logits"), want[k], rtol=1e-5, atol=1e-5)
        token = r.get_response()["parameters"].get("state_token")
        assert token or k == len(chunks) - 1


def test_bad_tokens_are_clean_4xx(replicas, lm, tmp_path):
    import httpx
    a, _, other = replicas
    client = httpclient.InferenceServerClient(a)
    token = _infer(client, [1, 2], sequence_id="t", sequence_start=True).get_response()["parameters"]["state_token"]
    body = lambda tok, seq="t": {"inputs": [{"name": "tokens", "shape": [1, 1], "datatype": "INT64", "data": [3]}],  # noqa: E731
                                 "parameters": {"sequence_id": seq, "state_token": tok}}
    flipped = token[:40] + ("A" if token[40] != "A" else "B") + token[41:]
    cases = [(token[:-10], 400, "bytes"), (flipped, 403, "signature"), ("!!!", 400, "base64"), (123, 400, "string"),
             (None, 400, "without its state_token")]
    for tok, status, words in cases:
        payload = body(tok)
        if tok is None:
            del payload["parameters"]["state_token"]
        r = httpx.post(f"http://{a}/v2/models/lm.streaming/infer", json=payload)
        assert r.status_code == status and words in r.json()["error"], (tok, r.status_code, r.text)
    r = httpx.post(f"http://{a}/v2/models/lm.streaming/infer", json=body(token, "other-seq"))
    assert r.status_code == 400 and "another sequence" in r.json()["error"]
    r = httpx.post(f"http://{other}/v2/models/lm.streaming/infer", json=body(token))  # another key
    assert r.status_code == 403 and "another key" in r.json()["error"]
    torch.manual_seed(1)  # another model with the same shapes, on a replica with the same key
    m2 = CharLM(ModelConfig(vocab_size=len(VOCAB), embed=6, hidden=16, layers=2), Vocab(VOCAB)).eval()
    p2 = export_onnx(m2, tmp_path / "other.onnx", "streaming")
    with serving(create_app(str(p2), ServerConfig(), name="lm.streaming", state_key=KEY)) as u:
        r = httpx.post(f"http://{u}/v2/models/lm.streaming/infer", json=body(token))
        assert r.status_code == 400 and "another model" in r.json()["error"]
        assert httpx.get(f"http://{u}/v2/health/live").status_code == 200


def test_replicas_need_a_state_key_and_keys_are_checked(cli_here, lm, tmp_path, monkeypatch):
    monkeypatch.delenv("LSTM_EXPORT_STATE_KEY", raising=False)
    r = cli_here("serve", lm[1], "--replicas", "2", "--port", "0")
    assert r.returncode == 2 and "needs a state key" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    short = tmp_path / "short.key"
    short.write_bytes(b"abc")
    r = cli_here("serve", lm[1], "--state-key-file", short, "--port", "0")
    assert r.returncode == 2 and "at least 16" in r.stderr, r.stderr
    r = cli_here("serve", lm[1], "--state-key-file", tmp_path / "missing.key", "--port", "0")
    assert r.returncode == 2 and "missing.key" in r.stderr, r.stderr


def test_a_restarted_sequence_is_not_forgotten_when_its_old_stream_fails(lm):
    """A sequence restarted (sequence_start again) while its previous stream's request is still
    queued: that request fails as expired, and the new stream stays the sequence's, open and in use
    (the server used to drop the new stream from its map and leak it until the idle timeout: a
    random-load run filled max_streams and answered every request after with 429)."""
    import asyncio

    from lstm_export.serving.oip import V2Error, V2Model
    from lstm_export.serving.streaming import StreamError, StreamingSession

    def body(ids, **params):
        return {"inputs": [{"name": "tokens", "shape": [1, len(ids)], "datatype": "INT64", "data": ids}],
                "parameters": {"sequence_id": 7, **params}}

    async def main(model):
        first = model.begin(body([1, 2], sequence_start=True), b"")
        old = model.session.feed_async(first.sid, first.chunk)  # queued for this loop turn
        second = model.begin(body([3], sequence_start=True), b"")  # closes the first stream
        with pytest.raises(V2Error, match="expired"):
            try:
                outs = await old
            except StreamError as e:
                model.end(first, None, e)
            else:
                model.end(first, outs, None)
        model.end(second, await model.session.feed_async(second.sid, second.chunk), None)
        third = model.begin(body([4], sequence_end=True), b"")  # continues the second stream
        return model.end(third, await model.session.feed_async(third.sid, third.chunk), None)

    with StreamingSession(lm[1]) as session:
        response, _ = asyncio.run(main(V2Model(session, "lm.streaming", None)))
        assert session.open_streams == 0  # nothing leaked
    want = _expected(lm[0], [[3], [4]])[1]
    np.testing.assert_allclose(response["outputs"][0]["data"].reshape(response["outputs"][0]["shape"]), want,
                               rtol=1e-5, atol=1e-5)
