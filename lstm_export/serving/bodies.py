"""Request bodies and error bodies shared by both protocols (/v1 and the Open Inference Protocol v2).

Below `server` and `oip`, which both import it: one JSON check for every route, and each protocol's
error shape in one place ({"error": {"code", "message"}} for /v1, {"error": message} for v2).
"""
import json

MAX_DEPTH = 32  # nesting a request body may have: a chunk is 2 deep; deeper is an attack, not a request


class BodyError(ValueError):
    """A request body that is not a JSON object; the message says what is wrong (HTTP 400)."""


def v1_error(status: int, code: str, message: str):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def v2_error(status: int, message: str):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": message}, status_code=status)


def json_object(raw: bytes) -> dict:
    """The request's JSON object. Raises BodyError for: not JSON, NaN or Infinity (not JSON either,
    though Python's parser takes them), nesting deeper than MAX_DEPTH (the parser recurses), an
    integer too long to convert, or a value that is not an object."""
    raw = raw or b"{}"
    # the scan is Python per byte: only bodies with enough brackets to be too deep pay for it
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth(raw) > MAX_DEPTH:
        raise BodyError(f"body nests deeper than {MAX_DEPTH} levels")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise BodyError(f"body is not valid JSON: {str(e).splitlines()[0][:200]}") from None
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
