"""Request bodies and error bodies shared by both protocols (/v1 and the Open Inference Protocol v2).

Below `server` and `oip`, which both import it: one JSON check for every route, and each protocol's
error shape in one place ({"error": {"code", "message"}} for /v1, {"error": message} for v2).
"""
import json
import re

import numpy as np
import orjson

from lstm_export.common.errors import first_line

MAX_DEPTH = 32  # nesting a request body may have: a chunk is 2 deep; deeper is an attack, not a request


class BodyError(ValueError):
    """A request body that is not a JSON object; the message says what is wrong (HTTP 400)."""


# a run of 19 digits may be an integer beyond 64 bits, which orjson reads as a float where Python's
# parser keeps an int (2**64 in INT64 data is "out of range", not "not an integer")
_LONG_NUMBER = re.compile(rb"\d{19}")


def v1_error(status: int, code: str, message: str):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def v2_error(status: int, message: str):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": message}, status_code=status)


def error_body(message: str) -> bytes:
    """A v2 error's JSON bytes."""
    return orjson.dumps({"error": message})


def v1_error_body(code: str, message: str) -> bytes:
    """A /v1 error's JSON bytes."""
    return orjson.dumps({"error": {"code": code, "message": message}})


def json_answer(status: int, body: bytes) -> tuple[int, list, bytes]:
    """A whole JSON response as (status, headers, body), the shape the hot path answers in."""
    return status, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body


def dumps(obj) -> bytes:
    """A response as JSON bytes; numpy arrays in it are written as lists without a Python list
    between (orjson: float32 in its shortest form, which reads back to the same float32). A NaN or
    Inf, which JSON cannot hold and orjson would write as null, goes out as Python's json writes it
    (NaN, Infinity), as it always has: never a silent null in place of a number."""
    try:
        out = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:  # an int beyond 64 bits echoed back (a sequence_id)
        out = None
    if out is not None and not (b"null" in out and _non_finite(obj)):
        return out
    return json.dumps(obj, default=lambda a: a.tolist()).encode()


def _non_finite(obj) -> bool:
    if isinstance(obj, dict):
        return any(_non_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_non_finite(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.dtype.kind == "f" and not np.isfinite(obj).all()
    return isinstance(obj, float) and not np.isfinite(obj)


def json_object(raw: bytes) -> dict:
    """The request's JSON object. Raises BodyError for: not JSON, NaN or Infinity (not JSON either,
    though Python's parser takes them), nesting deeper than MAX_DEPTH (the parser recurses), an
    integer too long to convert, or a value that is not an object."""
    raw = raw or b"{}"
    # the scan is Python per byte: only bodies with enough brackets to be too deep pay for it
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth(raw) > MAX_DEPTH:
        raise BodyError(f"body nests deeper than {MAX_DEPTH} levels")
    if not _LONG_NUMBER.search(raw):
        # orjson and Python's parser read every such body alike (no integer past 64 bits); what
        # orjson refuses (NaN, a BOM, a lone surrogate, UTF-16) Python's parser reads or words
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
        else:
            if not isinstance(body, dict):
                raise BodyError("body must be a JSON object")
            return body
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise BodyError(f"body is not valid JSON: {first_line(e, 200)}") from None
    if not isinstance(body, dict):
        raise BodyError("body must be a JSON object")
    return body


def _depth(raw: bytes) -> int:
    """The deepest bracket nesting outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in raw.decode("utf-8", errors="replace"):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value; send a finite number")
