"""Request and response JSON (serving/bodies.py): orjson on the hot path must read every body exactly
as Python's json module does (the oracle), and write every response so that it reads back to the
same numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest

st = pytest.importorskip("hypothesis.strategies", reason="hypothesis is not installed")
from hypothesis import given, settings  # noqa: E402

from lstm_export.serving.bodies import BodyError, dumps, json_object  # noqa: E402


def _oracle(raw: bytes):
    """What the server answered before orjson: Python's parser, NaN and Infinity refused."""
    def no_constant(name):
        raise ValueError(name)
    try:
        body = json.loads(raw, parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError):
        return BodyError
    return body if isinstance(body, dict) else BodyError


def _same(a, b) -> bool:
    """Equal values of equal types all the way down (1 and 1.0 differ: an INT64 tensor takes one)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


NUMBERS = st.one_of(st.integers(-2 ** 80, 2 ** 80), st.integers(-10, 10), st.floats(allow_nan=False),
                    st.sampled_from([2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, -2 ** 63, -2 ** 63 - 1]))
VALUES = st.recursive(st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=4)),
                      lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=3), c,
                                                                                  max_size=3)), max_leaves=10)
TEXTS = st.one_of(st.dictionaries(st.text(max_size=3), VALUES, max_size=3).map(lambda v: json.dumps(v).encode()),
                  VALUES.map(lambda v: json.dumps(v).encode()),
                  st.sampled_from([b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": 1e400}', b'{"a": -0}',
                                   b'\xef\xbb\xbf{"a": 1}', b'{"a": "\\ud800"}', '{"a": 1}'.encode("utf-16"),
                                   b'{"a": 1,}', b'{"a": 1} x', b'{"a": "\xff"}', b'{"a":1,"a":2}', b"",
                                   b'{"n": ' + b"9" * 30 + b"}", b'{"n": 12345678901234567890.5}']),
                  st.binary(max_size=12))


@settings(max_examples=400, deadline=None)
@given(raw=TEXTS)
def test_bodies_read_as_pythons_parser_reads_them(raw):
    want = _oracle(raw or b"{}")
    if want is BodyError:
        with pytest.raises(BodyError):
            json_object(raw)
    else:
        assert _same(json_object(raw), want), raw


def test_an_integer_past_64_bits_stays_an_integer():
    """orjson reads 2**64 as a float; the INT64 check must still see an out-of-range integer."""
    body = json_object(b'{"data": [18446744073709551616, 1]}')
    assert body["data"] == [2 ** 64, 1] and type(body["data"][0]) is int


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=50))
def test_float32_outputs_read_back_to_the_same_float32(values):
    a = np.array(values, np.float32)
    back = np.array(json.loads(dumps({"data": a}))["data"], np.float32)
    assert back.tobytes() == a.tobytes()


def test_non_finite_outputs_are_written_as_before_never_as_null():
    out = dumps({"outputs": [{"data": np.array([1.5, np.nan, -np.inf], np.float32)}]})
    assert b"null" not in out and b"NaN" in out and b"-Infinity" in out
    data = json.loads(out)["outputs"][0]["data"]
    assert data[0] == 1.5 and data[1] != data[1] and data[2] == -float("inf")
    assert json.loads(dumps({"parameters": {"sequence_id": 2 ** 70}})) == {"parameters": {"sequence_id": 2 ** 70}}
    assert dumps({"id": "null"}) == b'{"id":"null"}'  # the word in a string is no reason to fall back
