"""The v2 routes are strict: every body that does not match the model's metadata exactly is a JSON
400 naming the field (never coerced, never a 500), and a body that does gets the model's answer.
The oracle is the metadata itself (`valid` below, written from the protocol and the model's
metadata, not from the server's code) and, for the numbers, the model run in-process."""
from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from lstm_export.charlm import CharLM
from lstm_export.config import ModelConfig
from lstm_export.data import Vocab
from lstm_export.export import export_onnx

pytest.importorskip("fastapi", reason="fastapi is not installed")
st = pytest.importorskip("hypothesis.strategies", reason="hypothesis is not installed")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from lstm_export.serving.server import ServerConfig, create_app  # noqa: E402

VOCAB = "abcdefghij .\n"
V, MAX_CHUNK = len(VOCAB), 16
INFER = "/v2/models/lm/infer"
KEY = b"0123456789abcdef-strict-key"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    torch.manual_seed(0)
    m = CharLM(ModelConfig(vocab_size=V, embed=4, hidden=8, layers=1), Vocab(VOCAB)).eval()
    return m, export_onnx(m, tmp_path_factory.mktemp("strict") / "lm.onnx", "streaming")


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(str(lm[1]), ServerConfig(max_streams=8, max_chunk=MAX_CHUNK), name="lm")) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(lm):
    with TestClient(create_app(str(lm[1]), ServerConfig(max_streams=8, max_chunk=MAX_CHUNK), name="lm",
                               state_key=KEY)) as c:
        yield c


def _body(data, shape=None, datatype="INT64", **extra):
    shape = [1, len(data)] if shape is None else shape
    return {"inputs": [{"name": "tokens", "shape": shape, "datatype": datatype, "data": data}], **extra}


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def test_a_valid_body_gets_the_models_answer(client, lm):
    r = client.post(INFER, json=_body([1, 2, 3]))
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), _logits(lm[0], [1, 2, 3]), atol=1e-5)


BAD = [
    (_body([1.5, 2.7]), "INT64 data must be integers, got 1.5"),  # numpy would truncate to [1, 2]
    (_body([1.0, 2.0]), "must be integers"),
    (_body(["1", "2"]), "must be integers, got '1'"),
    (_body([True, False]), "must be integers, got True"),
    (_body([1, None]), "must be integers, got None"),
    (_body([1, 2], datatype="INT32"), "datatype INT32 is not the model's; send INT64"),
    (_body([1, 2], datatype="UINT8"), "datatype UINT8 is not the model's"),
    (_body([1, 2], datatype="FP32"), "datatype FP32 is not the model's"),
    (_body([2 ** 63, 1]), "out of the range of INT64"),
    (_body([1], shape=[1, 2 ** 70]), "elements, more than"),
    (_body([1], shape=[2 ** 40, 2 ** 40]), "elements, more than"),
    (_body([1], shape=[1, True]), "'shape' must be a list of non-negative integers"),
    (_body([1], shape=[1, 1.0]), "'shape' must be a list"),
    (_body({"a": 1}), "'data' must be a list"),
    ({"inputs": [{"name": "tokens", "shape": [1, 1], "datatype": "INT64", "data": [1], "parameters": [1]}]},
     "input 'tokens': 'parameters' must be an object"),
    (_body([1], outputs=[{"name": "logits", "parameters": ["binary_data"]}]),
     "output 'logits': 'parameters' must be an object"),
    (_body([1], parameters=[]), "the request: 'parameters' must be an object"),
    (_body([1], parameters=None), "'parameters' must be an object"),
    (_body([1], outputs=None), "'outputs' must be a list"),
    (_body([1], id=7), "'id' must be a string"),
    (_body([1], parameters={"sequence_id": 1.5}), "sequence_id must be"),
    (_body([1], parameters={"binary_data_output": 1}), "true or false"),
    # a parameter the server would ignore may be one the client counts on (a typo of binary_data_output)
    (_body([1], parameters={"binary_data_outptu": True}), "unknown parameter(s) 'binary_data_outptu'"),
    (_body([1], parameters={"": None}), "unknown parameter(s) ''"),
    (_body([1], outputs=[{"name": "logits", "parameters": {"classification": 3}}]), "unknown parameter"),
    ({"inputs": [{"name": "tokens", "shape": [1, 1], "datatype": "INT64", "data": [1],
                  "parameters": {"binary_data_size": 8}}]}, "binary_data_size"),
]


@pytest.mark.parametrize("body,words", BAD, ids=[w[:40] for _, w in BAD])
def test_each_malformed_field_is_a_400_naming_it(client, body, words):
    r = client.post(INFER, json=body)
    assert r.status_code == 400 and words in r.json()["error"], (r.status_code, r.text)


def test_unknown_routes_answer_in_each_protocols_error_shape(client):
    for path in ("/v2/nope", "/v2/models/lm/nope", "/v2/repository/index"):
        r = client.get(path)
        assert r.status_code == 404 and set(r.json()) == {"error"} and path in r.json()["error"], r.text
    r = client.delete("/v2/models/lm/infer")
    assert r.status_code == 405 and "error" in r.json()
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def _seq(c, seq, ids, start=False, end=False, token=None):
    p = {"sequence_id": seq, "sequence_start": start, "sequence_end": end}
    if token is not None:
        p["state_token"] = token
    return c.post(INFER, json=_body(ids, parameters=p))


def test_numeric_and_string_sequence_ids_are_two_sequences(client, lm):
    """As in Triton: 7 and "7" do not share a state; each continues its own."""
    assert _seq(client, 7, [1, 2], start=True).status_code == 200
    assert _seq(client, "7", [5], start=True).status_code == 200
    r = _seq(client, 7, [3], end=True)
    out = r.json()["outputs"][0]
    want = _logits(lm[0], [1, 2, 3])[:, -1:]
    np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), want, atol=1e-5)
    assert _seq(client, "7", [1], end=True).status_code == 200
    assert _seq(client, 7, [1]).status_code == 400  # ended


def test_a_state_token_is_bound_to_the_ids_type_and_a_bad_magic_says_so(keyed):
    r = _seq(keyed, 7, [1, 2], start=True)
    token = r.json()["parameters"]["state_token"]
    r = _seq(keyed, "7", [3], token=token)
    assert r.status_code == 400 and "another sequence" in r.json()["error"]
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[0] ^= 1
    flipped = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    r = _seq(keyed, 7, [3], token=flipped)
    assert r.status_code == 400 and "does not begin as this server's state tokens" in r.json()["error"], r.text


# --- property: never a 500, and 200 exactly for the bodies that match the metadata --------------

LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.integers(-2, V + 2),
                 st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=3))
ANY = st.recursive(LEAF, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=3), c,
                                                                                     max_size=2)), max_leaves=6)
TOKENS = st.lists(st.integers(-2, V + 1), max_size=MAX_CHUNK + 2)


@st.composite
def tensors(draw):
    ids = draw(st.one_of(TOKENS, st.lists(st.one_of(st.integers(0, V - 1), LEAF), max_size=4)))
    data = draw(st.sampled_from(["flat", "nested", "other"]))
    data = {"flat": ids, "nested": [ids], "other": draw(ANY)}[data]
    shape = draw(st.one_of(st.just([1, len(ids)]), st.just([len(ids), 1]), st.just([len(ids)]),
                           st.lists(st.one_of(st.integers(-1, 20), st.just(2 ** 70)), max_size=3), ANY))
    t = {"name": draw(st.sampled_from(["tokens", "tokens", "x", ""]) | ANY),
         "datatype": draw(st.sampled_from(["INT64", "INT64", "INT32", "UINT8", "FP32", "BOOL", "STRING", "int64"])
                          | ANY),
         "shape": shape, "data": data}
    if draw(st.booleans()):
        t["parameters"] = draw(st.one_of(st.just({}), ANY, st.fixed_dictionaries({"binary_data_size": ANY})))
    if draw(st.integers(0, 9)) == 0:
        del t[draw(st.sampled_from(sorted(t)))]
    return t


PARAMS = st.one_of(st.just({}), ANY, st.fixed_dictionaries({"binary_data_output": ANY}))
OUTPUTS = st.one_of(st.just([{"name": "logits"}]), ANY,
                    st.lists(st.fixed_dictionaries({"name": st.sampled_from(["logits", "h_n"]) | ANY},
                                                   optional={"parameters": PARAMS}), max_size=2))
RANDOM = st.fixed_dictionaries({"inputs": st.one_of(st.lists(tensors(), min_size=1, max_size=2), ANY)},
                               optional={"outputs": OUTPUTS, "parameters": PARAMS, "id": st.one_of(st.text(), ANY)})
IDS = st.lists(st.integers(0, V - 1), min_size=1, max_size=MAX_CHUNK)


@st.composite
def matching(draw):
    """A body that matches the metadata: the half of the property that says they get a 200."""
    ids = draw(IDS)
    t = {"name": "tokens", "datatype": "INT64", "shape": [1, len(ids)], "data": draw(st.sampled_from([ids, [ids]]))}
    if draw(st.booleans()):
        t["parameters"] = {}
    body = {"inputs": [t]}
    if draw(st.booleans()):
        body["outputs"] = [{"name": "logits"} if draw(st.booleans())
                           else {"name": "logits", "parameters": {"binary_data": draw(st.booleans())}}]
    if draw(st.booleans()):
        body["parameters"] = {"binary_data_output": draw(st.booleans())}
    if draw(st.booleans()):
        body["id"] = draw(st.text(max_size=5))
    return body


NASTY = st.one_of(ANY, st.sampled_from([1.5, "1", True, None, 2 ** 63, -1, V, 2 ** 70, [], {}, [1.5], ["a"]]))


@st.composite
def mutated(draw):
    """A matching body with one part replaced by another JSON value, or removed."""
    body = draw(matching())
    t = body["inputs"][0]
    flat = t["data"] if not isinstance(t["data"][0], list) else t["data"][0]
    where = draw(st.sampled_from(["body", "tensor", "element", "shape", "output"]))
    holder, key = {"body": (body, draw(st.sampled_from(["inputs", "outputs", "parameters", "id"]))),
                   "tensor": (t, draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters"]))),
                   "element": (flat, draw(st.integers(0, len(flat) - 1))),
                   "shape": (t["shape"], draw(st.integers(0, 1))),
                   "output": (body.setdefault("outputs", [{"name": "logits"}])[0],
                              draw(st.sampled_from(["name", "parameters"])))}[where]
    if draw(st.integers(0, 4)) == 0 and isinstance(holder, dict):
        holder.pop(key, None)
    else:
        holder[key] = draw(NASTY)
    return body


BODIES = st.one_of(matching(), mutated(), RANDOM)


def _leaves(data):
    if not isinstance(data, list):
        return None
    out = []
    for v in data:
        if isinstance(v, list):
            sub = _leaves(v)
            out.extend(sub)
        else:
            out.append(v)
    return out


def _params_ok(obj, allowed):
    if "parameters" not in obj:
        return True
    p = obj["parameters"]
    return isinstance(p, dict) and set(p) <= set(allowed) and all(isinstance(v, bool) for v in p.values())


def valid(body) -> bool | None:
    """Whether the body matches the model's metadata exactly (one INT64 'tokens' input of shape
    [1, n], 1 <= n <= max_chunk, token ids in [0, V); output 'logits'); None where either answer is
    right (a zero-length chunk, which the session may refuse)."""
    if "id" in body and not isinstance(body["id"], str):
        return False
    if not _params_ok(body, {"binary_data_output"}):
        return False
    if "outputs" in body:
        outs = body["outputs"]
        if not isinstance(outs, list) or not all(isinstance(o, dict) and o.get("name") == "logits"
                                                 and _params_ok(o, {"binary_data"}) for o in outs):
            return False
    ins = body.get("inputs")
    if not isinstance(ins, list) or len(ins) != 1 or not isinstance(ins[0], dict):
        return False
    t = ins[0]
    if t.get("name") != "tokens" or t.get("datatype") != "INT64" or "data" not in t:
        return False
    if "parameters" in t and t["parameters"] != {}:
        return False
    shape = t.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int for d in shape) and shape[0] == 1):
        return False
    leaves = _leaves(t["data"])
    if leaves is None or len(leaves) != shape[1] or shape[1] > MAX_CHUNK:
        return False
    if not all(type(v) is int and 0 <= v < V for v in leaves):
        return False
    return None if shape[1] == 0 else True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(body=BODIES)
def test_generated_bodies_never_500_and_pass_only_when_they_match(client, body):
    r = client.post(INFER, json=body)
    assert r.status_code < 500, (body, r.text)
    want = valid(body)
    if want is not None:
        assert (r.status_code == 200) == want, (body, r.status_code, r.text)
    if r.status_code != 200:
        assert 400 <= r.status_code < 500 and isinstance(r.json().get("error"), str), r.text
