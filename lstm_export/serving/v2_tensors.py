"""Request tensors of the Open Inference Protocol (v2), decoded strictly: a tensor whose datatype is
not the model's, or whose data are not values of that datatype, is a 400 naming the field, never
coerced. numpy's own conversion truncates 1.5 to 1 in an INT64 tensor, takes "7" and true as
numbers and wraps 2**63 around; a server that did that would answer a question nobody asked.

Checked here, once per tensor, in the order a reader of the error would want: the tensor is an
object with a string name; its datatype is a v2 datatype and the model's; its shape is a list of
non-negative integers whose product is within MAX_ELEMENTS; its parameters are an object; the data
are either `binary_data_size` bytes of the binary extension (exactly the shape's size) or a JSON
list, flat or nested, of exactly that many values, each a JSON value of the datatype's kind (no
bool in a number tensor, no float in an integer one, no number in a BOOL one) within its range.
"""
import numpy as np

DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
             "FP32": np.float32, "FP64": np.float64}
NAMES = {np.dtype(v): k for k, v in DATATYPES.items()}
# The most elements one request tensor may declare: far above any chunk a streaming model takes
# (the session's max_chunk refuses long ones with its own message), far below what could not be
# allocated; it keeps a dimension of 2**70 from reaching numpy's int64 arithmetic.
MAX_ELEMENTS = 1 << 28


class V2Error(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_int(v) -> bool:
    """A JSON integer (Python's bool is an int; JSON's true is not)."""
    return isinstance(v, int) and not isinstance(v, bool)


def params_of(obj: dict, where: str, known: tuple[str, ...]) -> dict:
    """obj's 'parameters', which the protocol defines as an optional object (absent: none; null is
    not an object), holding only the `known` keys: a parameter this server would ignore (a typo of
    binary_data_output, say) may be one that the client expects to change the answer, so it is refused."""
    if "parameters" not in obj:
        return {}
    p = obj["parameters"]
    if not isinstance(p, dict):
        raise V2Error(400, f"{where}: 'parameters' must be an object, got {type(p).__name__}")
    if p.keys() <= set(known):
        return p
    unknown = sorted(k for k in p if k not in known)
    if unknown:
        raise V2Error(400, f"{where}: unknown parameter(s) {', '.join(map(repr, unknown))}"[:200]
                           + f"; this server takes {', '.join(known)}")
    return p


def decode_tensor(t, blob: bytes, offset: int, want: dict) -> tuple[np.ndarray, int]:
    """One request tensor as numpy, and the offset past its binary bytes. `want` is the model's
    metadata entry for it ({"name", "datatype", "shape"}); the caller matched the name."""
    if not isinstance(t, dict) or not isinstance(t.get("name"), str):
        raise V2Error(400, "each input needs a 'name', a 'shape', a 'datatype' and 'data' (or binary_data_size)")
    name, dt = t["name"], t.get("datatype")
    if not isinstance(dt, str) or dt not in DATATYPES:
        raise V2Error(400, f"input {name!r}: datatype {dt!r} is not one of {', '.join(DATATYPES)}")
    if dt != want["datatype"]:
        raise V2Error(400, f"input {name!r}: datatype {dt} is not the model's; send {want['datatype']}")
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise V2Error(400, f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}"[:300])
    size = 1
    for d in shape:  # Python integers: no overflow on the way to the bound
        size *= d
    if size > MAX_ELEMENTS:
        raise V2Error(400, f"input {name!r}: shape {shape} declares {size} elements, more than {MAX_ELEMENTS}"[:300])
    dtype = np.dtype(DATATYPES[dt])
    nbytes = params_of(t, f"input {name!r}", ("binary_data_size",)).get("binary_data_size")
    if nbytes is not None:
        if not is_int(nbytes) or nbytes != size * dtype.itemsize or offset + nbytes > len(blob):
            raise V2Error(400, f"input {name!r}: binary_data_size {nbytes!r} does not match shape {shape} of {dt}, "
                               "or runs past the body")
        if "data" in t:
            raise V2Error(400, f"input {name!r}: send 'data' or binary_data_size, not both")
        # a read-only view of the body's bytes: nothing downstream writes to a request's tensor
        return np.frombuffer(blob, dtype, size, offset).reshape(shape), offset + nbytes
    if "data" not in t:
        raise V2Error(400, f"input {name!r} has no 'data' (and no binary_data_size)")
    values = _flatten(t["data"], name)
    if len(values) != size:
        raise V2Error(400, f"input {name!r}: 'data' holds {len(values)} values, shape {shape} needs {size}")
    _check_values(values, dt, dtype, name)
    return np.array(values, dtype).reshape(shape), offset


def _flatten(data, name: str) -> list:
    """The leaves of a JSON list, flat or nested (the protocol allows both), in row-major order."""
    if not isinstance(data, list):
        raise V2Error(400, f"input {name!r}: 'data' must be a list, got {type(data).__name__}")
    out, stack = [], [iter(data)]
    while stack:  # depth is bounded by the body parser's nesting limit
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def _check_values(values: list, dt: str, dtype: np.dtype, name: str) -> None:
    if dt == "BOOL":
        ok, kind = (lambda v: isinstance(v, bool)), "true or false"
    elif dtype.kind in "iu":
        ok, kind = is_int, "integers"
    else:
        ok, kind = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)), "numbers"
    bad = [v for v in values if not ok(v)][:1]  # a list: the offending value may itself be None
    if bad:
        raise V2Error(400, f"input {name!r}: {dt} data must be {kind}, got {bad[0]!r}"[:300])
    if not values or dt == "BOOL":
        return
    lo, hi = min(values), max(values)
    info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)
    if lo < info.min or hi > info.max:
        out = lo if lo < info.min else hi
        raise V2Error(400, f"input {name!r}: {out!r} is out of the range of {dt} [{info.min}, {info.max}]"[:300])
