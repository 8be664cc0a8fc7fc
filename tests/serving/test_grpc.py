"""The Open Inference Protocol over gRPC (serving/grpc_oip.py), driven by Triton's own gRPC client:
health, metadata and the model configuration; unary sequences interleaved; a sequence streamed chunk
by chunk on ModelStreamInfer; every chunk's logits equal to the same tokens run in one go through
ONNX Runtime in-process; errors as the matching gRPC status, and a refused streamed request that
leaves the stream working."""
from __future__ import annotations

import queue

import numpy as np
import onnxruntime as ort
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

from lstm_export.serving.loadtest import free_port  # noqa: E402
from lstm_export.serving.server import ServerConfig, create_app  # noqa: E402

from .test_oip import VOCAB, serving, small_lm  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return small_lm(tmp_path_factory.mktemp("grpc"))


@pytest.fixture(scope="module")
def addresses(lm):
    grpc_port = free_port()
    app = create_app(str(lm[1]), ServerConfig(max_streams=8, max_chunk=64), name="lm",
                     grpc_address=f"127.0.0.1:{grpc_port}")
    with serving(app) as http:
        yield http, f"127.0.0.1:{grpc_port}"


@pytest.fixture()
def client(addresses):
    c = grpcclient.InferenceServerClient(addresses[1])
    yield c
    c.close()


def in_one_go(path, tokens: list[int]) -> np.ndarray:
    """The logits of every token, the whole sequence in one ONNX Runtime run from zero state."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    layers, hidden = shapes["h_0"][0], shapes["h_0"][2]
    zeros = np.zeros((layers, 1, hidden), np.float32)
    return sess.run(["logits"], {"tokens": np.array([tokens], np.int64), "h_0": zeros, "c_0": zeros})[0][0]


def _input(chunk):
    x = grpcclient.InferInput("tokens", [1, len(chunk)], "INT64")
    x.set_data_from_numpy(np.array([chunk], np.int64))
    return x


def test_health_metadata_and_config(client, addresses):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lm")
    meta = client.get_model_metadata("lm", as_json=True)
    assert meta["inputs"] == [{"name": "tokens", "datatype": "INT64", "shape": ["-1", "-1"]}]
    config = client.get_model_config("lm", as_json=True)["config"]
    assert config["max_batch_size"] == 1 and "sequence_batching" in config
    assert config["input"] == [{"name": "tokens", "data_type": "TYPE_INT64", "dims": ["-1"]}]
    assert "model_configuration" in client.get_server_metadata(as_json=True)["extensions"]
    import httpx  # the same configuration on HTTP, where perf_analyzer asks for it first
    http = httpx.get(f"http://{addresses[0]}/v2/models/lm/config").json()
    assert http["max_batch_size"] == 1 and http["input"][0]["data_type"] == "TYPE_INT64"
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as e:
        client.get_model_config("nope")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_two_interleaved_unary_sequences_equal_one_go(client, lm):
    """Sequence 7 (an integer id) and "talk" (a string id), chunk by chunk in turn: each chunk's
    logits equal that sequence's tokens run in one go; the id and sequence parameters echo back."""
    a, b = [1, 2, 3, 4, 5, 6, 7], [8, 0, 9, 3, 3, 2, 1]
    want = {7: in_one_go(lm[1], a), "talk": in_one_go(lm[1], b)}
    got = {7: [], "talk": []}
    cuts = [(0, 3), (3, 4), (4, 7)]
    for k, (lo, hi) in enumerate(cuts):
        for seq, tokens in ((7, a), ("talk", b)):
            r = client.infer("lm", [_input(tokens[lo:hi])], sequence_id=seq, sequence_start=k == 0,
                             sequence_end=k == len(cuts) - 1, request_id=f"{seq}-{k}")
            assert r.get_response().id == f"{seq}-{k}"
            got[seq].append(r.as_numpy("logits")[0])
    for seq in got:
        np.testing.assert_allclose(np.concatenate(got[seq]), want[seq], rtol=1e-5, atol=1e-5, err_msg=str(seq))


def test_a_streamed_sequence_chunk_by_chunk(client, lm):
    """ModelStreamInfer: one sequence's chunks on one bidirectional stream, answered in order, equal
    to one go; a refused request (a float tensor) answers with its error on the stream, which goes on."""
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        cuts = [(0, 1), (1, 4), (4, 5), (5, 10)]
        for k, (lo, hi) in enumerate(cuts):
            client.async_stream_infer("lm", [_input(tokens[lo:hi])], sequence_id=42, sequence_start=k == 0,
                                      sequence_end=k == len(cuts) - 1, request_id=str(k))
            if k == 1:
                bad = grpcclient.InferInput("tokens", [1, 2], "FP32")
                bad.set_data_from_numpy(np.ones((1, 2), np.float32))
                client.async_stream_infer("lm", [bad], sequence_id=42, request_id="bad")
        answers = [results.get(timeout=30) for _ in range(len(cuts) + 1)]
    finally:
        client.stop_stream()
    errors = [e for _, e in answers if e is not None]
    assert len(errors) == 1 and "datatype FP32 is not the model's" in str(errors[0])
    logits = [r.as_numpy("logits")[0] for r, e in answers if e is None]
    np.testing.assert_allclose(np.concatenate(logits), in_one_go(lm[1], tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inputs,message", [
    (lambda: [grpcclient.InferInput("tokens", [1, 2], "FP32")], "datatype FP32 is not the model's"),
    (lambda: [grpcclient.InferInput("words", [1, 2], "INT64")], "input 'words' is not this model's"),
    (lambda: [grpcclient.InferInput("tokens", [2, 2], "INT64")], "send one stream, batch 1"),
])
def test_a_bad_request_is_invalid_argument_in_one_line(client, inputs, message):
    x = inputs()[0]
    x.set_data_from_numpy(np.zeros(x.shape(), np.float32 if x.datatype() == "FP32" else np.int64))
    with pytest.raises(InferenceServerException, match=message) as e:
        client.infer("lm", [x])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "\n" not in e.value.message()


def test_a_sequence_not_started_is_refused_and_an_unknown_model_is_not_found(client):
    with pytest.raises(InferenceServerException, match="was not started") as e:
        client.infer("lm", [_input([1, 2])], sequence_id=99)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="unknown model") as e:
        client.infer("other", [_input([1])])
    assert e.value.status() == "StatusCode.NOT_FOUND"


# --- the property: any request the protobuf can carry gets the model's answer or INVALID_ARGUMENT ---
st = pytest.importorskip("hypothesis.strategies", reason="hypothesis is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402

V, MAX_CHUNK = len(VOCAB), 64  # the served model's vocabulary and the fixture's max_chunk
PARAM = st.one_of(st.booleans(), st.integers(-3, 3), st.text(max_size=3))


@st.composite
def requests(draw):
    """(ModelInferRequest, whether it matches the metadata: one INT64 'tokens' [1, n], 1 <= n <=
    max_chunk, ids in [0, V), as raw bytes of exactly n int64 or as n int64 contents; parameters
    only binary_data_output as a bool; any output asked for 'logits')."""
    from tritonclient.grpc import service_pb2 as pb
    ids = draw(st.lists(st.integers(-2, V + 1), max_size=MAX_CHUNK + 2))
    name = draw(st.sampled_from(["tokens", "tokens", "tokens", "x", ""]))
    datatype = draw(st.sampled_from(["INT64", "INT64", "INT64", "INT32", "FP32", "BOOL", "BYTES"]))
    shape = draw(st.one_of(st.just([1, len(ids)]), st.just([len(ids)]), st.just([len(ids), 1]),
                           st.lists(st.integers(0, 20), max_size=3)))
    req = pb.ModelInferRequest(model_name="lm", id=draw(st.text(max_size=4)))
    req.inputs.add(name=name, datatype=datatype, shape=shape)
    raw = draw(st.booleans())
    payload = np.array(ids, np.int64).tobytes()
    if raw:
        cut = draw(st.sampled_from([0, 0, 0, 1, 8]))
        req.raw_input_contents.append(payload[:len(payload) - cut] if cut else payload)
    else:
        req.inputs[0].contents.int64_contents.extend(ids)
    params_ok = True
    for key in draw(st.lists(st.sampled_from(["binary_data_output", "priority", "nonsense"]), max_size=2,
                             unique=True)):
        value = draw(PARAM)
        grpc_oip_set(req.parameters, key, value)
        # priority is a scheduling hint of any value; binary_data_output a bool; nothing else is known
        params_ok &= key == "priority" or key == "binary_data_output" and isinstance(value, bool)
    output = draw(st.sampled_from([None, "logits", "h_n"]))
    if output:
        req.outputs.add(name=output)
    ok = (name == "tokens" and datatype == "INT64" and shape == [1, len(ids)] and 1 <= len(ids) <= MAX_CHUNK
          and all(0 <= i < V for i in ids) and (not raw or cut == 0) and params_ok and output != "h_n")
    return req, ok


def grpc_oip_set(params, key, value):
    from lstm_export.serving.grpc_oip import _set_param
    _set_param(params, key, value)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=requests())
def test_any_request_is_answered_or_refused_never_an_internal_error(addresses, case):
    import grpc
    from tritonclient.grpc import service_pb2_grpc
    req, ok = case
    with grpc.insecure_channel(addresses[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            r = stub.ModelInfer(req, timeout=30)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details(), req)
            assert not ok, (e.details(), req)
            assert "\n" not in e.details()
            return
    assert ok, req
    assert [o.name for o in r.outputs] == ["logits"] and r.id == req.id
    assert len(r.raw_output_contents[0]) == 4 * int(np.prod(r.outputs[0].shape))


def test_the_final_response_flag_of_tritons_clients(addresses):
    """perf_analyzer's gRPC requests ask for an empty final response (decoupled models): the one
    response a request gets here is marked final; a flag that is not a bool is refused."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    req = service_pb2.ModelInferRequest(model_name="lm", id="f")
    req.inputs.add(name="tokens", datatype="INT64", shape=[1, 2])
    req.raw_input_contents.append(np.array([1, 2], np.int64).tobytes())
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    with grpc.insecure_channel(addresses[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(iter([req]), timeout=30))
        assert len(answers) == 1 and not answers[0].error_message
        assert answers[0].infer_response.parameters["triton_final_response"].bool_param is True
        req.parameters["triton_enable_empty_final_response"].string_param = "yes"
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "triton_enable_empty_final_response" in \
            e.value.details()


def test_a_runtime_failure_is_internal_in_one_line_and_the_stream_goes_on(lm):
    """What HTTP answers with a JSON 500 (the runtime failed) is INTERNAL with one line on gRPC, and
    an error_message on a stream, whose next request is answered."""
    port = free_port()
    app = create_app(str(lm[1]), ServerConfig(max_streams=8, max_chunk=64), name="lm", grpc_address=f"127.0.0.1:{port}")
    real, calls = app.state.session.submit, []

    def flaky(sid, chunk, done):  # the batch gRPC's hot path hands its chunks to (StreamingSession.submit)
        calls.append(1)
        if len(calls) in (1, 2):
            raise RuntimeError("device lost\nsecond line")
        return real(sid, chunk, done)
    app.state.session.submit = flaky
    with serving(app):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        with pytest.raises(InferenceServerException, match="device lost") as e:
            client.infer("lm", [_input([1, 2])])
        assert e.value.status() == "StatusCode.INTERNAL" and "second line" not in e.value.message()
        results = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer("lm", [_input([1, 2])], request_id="a")
        client.async_stream_infer("lm", [_input([3])], request_id="b")
        (_, e1), (r2, e2) = results.get(timeout=30), results.get(timeout=30)
        client.stop_stream()
        client.close()
    assert e1 is not None and "device lost" in str(e1) and e2 is None and r2.as_numpy("logits").shape[1] == 1


def test_a_method_not_served_and_a_message_that_is_not_the_request_are_one_line(addresses):
    import grpc
    with grpc.insecure_channel(addresses[1]) as channel:
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary("/inference.GRPCInferenceService/RepositoryIndex")(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "RepositoryIndex" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff\xff\xff", timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a ModelInferRequest" in e.value.details()
        assert "\n" not in e.value.details()


def test_a_stream_that_breaks_leaves_the_others_working(addresses, lm):
    """One client drops its stream mid-sequence (its channel closed under it); another stream,
    interleaved with it, goes on to the end and equals one go."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    def request(tokens, seq, start, end):
        r = service_pb2.ModelInferRequest(model_name="lm")
        r.inputs.add(name="tokens", datatype="INT64", shape=[1, len(tokens)])
        r.raw_input_contents.append(np.array(tokens, np.int64).tobytes())
        r.parameters["sequence_id"].int64_param = seq
        r.parameters["sequence_start"].bool_param, r.parameters["sequence_end"].bool_param = start, end
        return r
    keep = [5, 6, 7, 8, 9, 1]
    broken = grpc.insecure_channel(addresses[1])
    calls = service_pb2_grpc.GRPCInferenceServiceStub(broken).ModelStreamInfer(
        iter([request([1, 2], 501, True, False), request([3], 501, False, False)]))
    next(calls)
    broken.close()  # mid-sequence: 501 never ends
    with grpc.insecure_channel(addresses[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(iter([request(keep[:2], 502, True, False), request(keep[2:], 502, False,
                                                                                                 True)]), timeout=30))
    assert all(not a.error_message for a in answers)
    logits = [np.frombuffer(a.infer_response.raw_output_contents[0], np.float32).reshape(
        a.infer_response.outputs[0].shape)[0] for a in answers]
    np.testing.assert_allclose(np.concatenate(logits), in_one_go(lm[1], keep), rtol=1e-5, atol=1e-5)
