"""The Open Inference Protocol (KServe v2) over HTTP, beside the server's own /v1 routes, as Triton,
KServe and Seldon MLServer speak it, so that standard clients (`tritonclient.http`) work unchanged.

Routes: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{name}, /v2/models/{name}/ready;
POST /v2/models/{name}/infer (and the same under /versions/{v}). Tensors are JSON (name, shape,
datatype, row-major data) or, with the binary tensor extension, raw bytes after a JSON header
(`Inference-Header-Content-Length`). Errors are `{"error": "..."}` with a 4xx status.

Streams follow Triton's sequence extension: the request parameters `sequence_id`, `sequence_start`
and `sequence_end` open, continue and close a stream; a request carries one stream's data input
with batch 1 (one step or many), and requests of different sequences are micro-batched by the
StreamingSession like /v1's. The state inputs and outputs (h, c) are the server's business and are
not in the metadata. With a state key (`serve --state-key-file`), the state leaves with every
response as a signed `state_token` parameter and comes back with the next request: no replica then
keeps per-stream state, and any replica with the same key and model continues the stream.
"""
# no `from __future__ import annotations` here: FastAPI reads the route functions' annotations
# (Request) at definition time
import logging
import os
import socket
import threading
from dataclasses import dataclass

import numpy as np

from .bodies import BodyError, dumps, error_body, json_answer, json_object, v2_error
from .state_token import TokenError, sign, verify
from .streaming import StreamError
from .v2_tensors import NAMES, V2Error, decode_tensor, is_int, params_of

HEADER = "inference-header-content-length"
_HEADER = HEADER.encode()
# Triton's request parameters (priority and timeout are scheduling hints that leave the answer alone)
# and the state token of a stateless replica; an output takes binary_data only.
REQUEST_PARAMS = ("sequence_id", "sequence_start", "sequence_end", "state_token", "binary_data_output",
                  "priority", "timeout")


def _shape(spec_shape) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in spec_shape]


def split_body(raw: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The request's JSON part and the binary bytes after it (the binary tensor extension)."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(raw):
            raise V2Error(400, f"{HEADER} {header_length!r} is not a length within the {len(raw)}-byte body")
        head, blob = raw[:int(header_length)], raw[int(header_length):]
    else:
        head, blob = raw, b""
    return json_object(head), blob


def _bool_param(params: dict, key: str) -> bool:
    v = params.get(key, False)
    if not isinstance(v, bool):
        raise V2Error(400, f"parameter {key!r} must be true or false, got {v!r}")
    return v


@dataclass
class _Call:
    """One infer request between its checks (V2Model.begin) and its answer (V2Model.end)."""

    body: dict
    chunk: np.ndarray
    seq: int | str | None
    start: bool
    end: bool
    wanted: list
    kind: str  # once (no sequence_id), token (state in a signed token), sequence (state kept here)
    sid: str  # the session's stream


class V2Model:
    """One streaming model behind the v2 routes: its metadata, its sequences, the infer call."""

    def __init__(self, session, name: str, key: bytes | None):
        self.session, self.name, self.key = session, name, key
        spec = session.data_spec
        self.data_name, self.batch_axis = spec.name, session.batch_axis
        self.outputs = [s for s in session.source.outputs][:1]  # the data output; h_n, c_n are state
        self.metadata = {
            "name": name, "versions": ["1"], "platform": "onnx",
            "inputs": [{"name": spec.name, "datatype": NAMES[np.dtype(spec.dtype)], "shape": _shape(spec.shape)}],
            "outputs": [{"name": s.name, "datatype": NAMES.get(np.dtype(s.dtype), "FP32"), "shape": _shape(s.shape)}
                        for s in self.outputs],
            "parameters": {"sequence": True, "state_tokens": key is not None},
        }
        self._sequences: dict[int | str, str] = {}  # sequence id -> stream id (without a key)
        self._lock = threading.Lock()

    async def infer(self, body: dict, blob: bytes) -> tuple[dict, list[bytes]]:
        """The response JSON (output data as numpy arrays: encode with bodies.dumps) and the binary
        outputs that follow it (empty for all-JSON). On the server's event loop: the chunk joins that
        loop iteration's batch (StreamingSession.feed_async). V2Error for a request to refuse."""
        call = self.begin(body, blob)
        try:
            outs = await self.session.feed_async(call.sid, call.chunk)
        except BaseException as e:  # cancelled too: end() closes what begin() opened, then re-raises
            return self.end(call, None, e)
        return self.end(call, outs, None)

    def begin(self, body: dict, blob: bytes) -> "_Call":
        """Checks a request and opens (or finds) the stream its chunk runs on: the first half of infer.
        Every check comes before any stream is touched, so a refused request changes no state."""
        params = params_of(body, "the request", REQUEST_PARAMS)
        if "id" in body and not isinstance(body["id"], str):
            raise V2Error(400, f"'id' must be a string, got {type(body['id']).__name__}")
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1:
            raise V2Error(400, f"send one input, {self.data_name!r} (the stream's state is kept by the server)")
        name = inputs[0].get("name") if isinstance(inputs[0], dict) else None
        if isinstance(name, str) and name != self.data_name:
            raise V2Error(400, f"input {name!r} is not this model's; it takes {self.data_name!r}")
        data, _ = decode_tensor(inputs[0], blob, 0, self.metadata["inputs"][0])
        if data.ndim != len(self.session.data_spec.shape) or data.shape[self.batch_axis] != 1:
            raise V2Error(400, f"input {self.data_name!r} has shape {list(data.shape)}: send one stream, batch 1 "
                               f"(metadata shape {self.metadata['inputs'][0]['shape']})")
        chunk = data[0] if self.batch_axis == 0 else data[:, 0]
        seq = params.get("sequence_id")
        if seq is not None and not (is_int(seq) and seq != 0 or isinstance(seq, str) and seq):
            raise V2Error(400, f"sequence_id must be a non-zero integer or a non-empty string, got {seq!r}")
        start, end = _bool_param(params, "sequence_start"), _bool_param(params, "sequence_end")
        wanted = self._wanted(body, params)
        if seq is None:  # a request of its own: a fresh stream, closed after it
            kind, sid = "once", self.session.open()
        elif self.key is not None:  # the state comes with the request, and leaves with the response
            kind, sid = "token", self.session.open(self._token_state(seq, start, params.get("state_token")))
        else:  # 7 and "7" are two sequences, as in Triton
            kind, sid = "sequence", self._sequence_stream(seq, start, end)
        return _Call(body, chunk, seq, start, end, wanted, kind, sid)

    def end(self, call: "_Call", outs, error) -> tuple[dict, list[bytes]]:
        """The second half of infer: closes what begin() opened and answers (or raises `error`, as
        the protocol's error where it is one)."""
        try:
            if error is not None:
                if call.kind == "sequence" and isinstance(error, StreamError) and error.status == 404:
                    with self._lock:  # only if it is still this stream: a new start may have replaced it
                        if self._sequences.get(call.seq) == call.sid:
                            del self._sequences[call.seq]
                    raise V2Error(400, f"sequence {call.seq!r} expired after the server's idle timeout; "
                                       "start it again") from None
                raise error
            params: dict = {}
            if call.kind == "token" and not call.end:
                params["state_token"] = sign(self.key, self.session.source.digest, call.seq,
                                             self.session.state(call.sid))
            if call.seq is not None:
                params.update(sequence_id=call.seq, sequence_start=call.start, sequence_end=call.end)
            return self._response(call.body, outs, params, call.wanted)
        finally:
            if call.kind != "sequence" or call.end:
                self._close(call.sid)

    def _token_state(self, seq, start: bool, token):
        if start:
            return None
        if token is None:
            raise V2Error(400, f"sequence {seq!r} continues without its state_token: send the state_token "
                               "parameter of the previous response (or sequence_start=true to begin again)")
        try:
            return verify(self.key, token, self.session.source.digest, seq, self.session.layers, self.session.hidden)
        except TokenError as e:
            raise V2Error(e.status, str(e)) from None

    def _sequence_stream(self, seq, start: bool, end: bool) -> str:
        with self._lock:
            sid = self._sequences.get(seq)
            if start:
                if sid is not None:  # a new start of a sequence id restarts it, as Triton does
                    self._close(sid)
                sid = self._sequences[seq] = self.session.open()
            elif sid is None:
                raise V2Error(400, f"sequence {seq!r} was not started (or has ended): send sequence_start=true first")
            if end:
                del self._sequences[seq]
        return sid

    def _close(self, sid: str) -> None:
        try:
            self.session.close(sid)
        except StreamError:  # already expired
            pass

    def _wanted(self, body: dict, params: dict) -> list[tuple[str, bool]]:
        """The requested outputs as (name, binary), checked against the model's."""
        binary_default = _bool_param(params, "binary_data_output")
        names = [o.name for o in self.outputs]
        wanted = body["outputs"] if "outputs" in body else [{"name": n} for n in names]
        if not isinstance(wanted, list):
            raise V2Error(400, "'outputs' must be a list of {'name': ...}")
        out = []
        for w in wanted:
            name = w.get("name") if isinstance(w, dict) else None
            if name not in names:
                raise V2Error(400, f"output {name!r} is not this model's; it gives {', '.join(names)}")
            binary = _bool_param(params_of(w, f"output {name!r}", ("binary_data",)), "binary_data")
            out.append((name, binary or binary_default))
        return out

    def _response(self, body: dict, outs: dict, params: dict, wanted) -> tuple[dict, list[bytes]]:
        tensors, blobs = [], []
        for name, binary in wanted:
            a = outs[name][None] if self.batch_axis == 0 else outs[name][:, None]
            a = a if a.flags.c_contiguous else np.ascontiguousarray(a)
            t = {"name": name, "datatype": NAMES[a.dtype], "shape": list(a.shape)}
            if binary:
                t["parameters"] = {"binary_data_size": a.nbytes}
                blobs.append(a.tobytes())
            else:
                t["data"] = a.reshape(-1)  # numpy: bodies.dumps writes it without a Python list
            tensors.append(t)
        response = {"model_name": self.name, "model_version": "1", "outputs": tensors}
        if "id" in body:
            response["id"] = body["id"]
        if params:
            response["parameters"] = params
        return response, blobs


# Triton's ModelConfig data types by v2 datatype
CONFIG_TYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
                "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
                "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64"}


def model_config(model: V2Model) -> dict:
    """Triton's ModelConfig of the served model, as a dict of its fields (JSON on HTTP, the message
    on gRPC): batch axis first makes max_batch_size 1 (one stream a request) and dims the rest;
    sequence_batching says requests carry sequence_id / start / end."""
    inp, outs = model.metadata["inputs"][0], model.metadata["outputs"]
    batched = model.batch_axis == 0

    def tensor(t):
        return {"name": t["name"], "data_type": CONFIG_TYPES[t["datatype"]],
                "dims": [int(d) for d in (t["shape"][1:] if batched else t["shape"])]}
    return {"name": model.name, "platform": "onnxruntime_onnx", "backend": "lstm-export",
            "max_batch_size": 1 if batched else 0, "input": [tensor(inp)], "output": [tensor(o) for o in outs],
            "sequence_batching": {"max_sequence_idle_microseconds": str(int(model.session.idle_timeout * 1e6))}}


class V2Infer:
    """POST /v2/models/{name}/infer (and under /versions/{v}/), the hot path: answer_soon() for
    serve's own protocol (http11), answer() for the ASGI edge (front.Front) under any other server,
    and a bare ASGI app for the FastAPI app's own route. No router, no request objects, no thread
    hop; errors are the protocol's JSON 4xx."""

    def __init__(self, model: V2Model):
        self.model = model
        self.served_by = [(b"x-served-by", f"{socket.gethostname()}:{os.getpid()}".encode())]  # which replica

    @staticmethod
    def model_of(path: str) -> str | None:
        """The model name in an infer route's path, or None for any other path."""
        if not (path.startswith("/v2/models/") and path.endswith("/infer")):
            return None
        parts = path[len("/v2/models/"):-len("/infer")].split("/")
        if len(parts) == 1 or len(parts) == 3 and parts[1] == "versions" and parts[2]:
            return parts[0] or None
        return None

    async def __call__(self, scope, receive, send):
        """ASGI (the FastAPI app's own route, behind its body limits): the body arrives whole."""
        code, headers, content = await self.answer(scope, (await receive())["body"])
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def answer(self, scope, raw: bytes) -> tuple[int, list, bytes]:
        """The status, headers and body of the response to one infer request's whole body."""
        try:
            call = self._begin(scope["path"], scope["headers"], raw)
        except (V2Error, StreamError, BodyError) as e:
            return _refusal(e)
        try:
            outs = await self.model.session.feed_async(call.sid, call.chunk)
        except BaseException as e:  # cancelled too: the stream is closed, then the error goes on
            return self._finish(call, None, e)
        return self._finish(call, outs, None)

    def answer_soon(self, path: str, headers: list, raw: bytes, reply) -> None:
        """answer() without a coroutine, for serve's own protocol (http11): reply(status, headers, body)
        is called once, at once for a refused request, else from the batch run that computes it.
        What the run raises that is not the protocol's error (a bug) reaches reply as a JSON 500."""
        try:
            call = self._begin(path, headers, raw)
        except (V2Error, StreamError, BodyError) as e:
            return reply(*_refusal(e))

        def done(outs, error):
            try:
                answer = self._finish(call, outs, error)
            except Exception as e:
                logging.getLogger("lstm_export.serve").exception("unexpected error on %s", path)
                answer = _error(500, f"{type(e).__name__}: {str(e)[:200]}")
            reply(*answer)

        try:
            self.model.session.submit(call.sid, call.chunk, done)
        except Exception as e:  # the session refused the chunk: the stream is closed as after a run
            done(None, e)

    def _begin(self, path: str, headers: list, raw: bytes):
        model_name = self.model_of(path)
        if model_name != self.model.name:
            raise V2Error(404, f"unknown model {model_name!r}; this server serves {self.model.name!r}")
        length = next((v.decode("latin-1") for k, v in headers if k == _HEADER), None)
        return self.model.begin(*split_body(raw, length))

    def _finish(self, call, outs, error) -> tuple[int, list, bytes]:
        try:
            response, blobs = self.model.end(call, outs, error)
        except (V2Error, StreamError) as e:  # the session's checks of the chunk too: the protocol's shape
            return _refusal(e)
        head = dumps(response)
        if not blobs:
            return 200, [_JSON, (b"content-length", str(len(head)).encode()), *self.served_by], head
        content = head + b"".join(blobs)
        return 200, [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(content)).encode()),
                     (b"inference-header-content-length", str(len(head)).encode()), *self.served_by], content


_JSON = (b"content-type", b"application/json")


def _refusal(e: Exception) -> tuple[int, list, bytes]:
    return _error(getattr(e, "status", 400), str(e))  # BodyError: a body that is not JSON, 400


def _error(status: int, message: str) -> tuple[int, list, bytes]:
    return json_answer(status, error_body(message))


def add_v2_routes(app, model: V2Model, infer: V2Infer) -> None:
    """The Open Inference Protocol's routes other than infer's POST (server.Front answers that)."""
    from lstm_export import __version__
    name = model.name

    def known(model_name: str):
        if model_name != name:
            raise V2Error(404, f"unknown model {model_name!r}; this server serves {name!r}")

    @app.exception_handler(V2Error)
    async def on_v2_error(request, exc: V2Error):
        return v2_error(exc.status, str(exc))

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata():
        return {"name": "lstm-export", "version": __version__,
                "extensions": ["binary_tensor_data", "parameters", "sequence"]}

    @app.get("/v2/models/{model_name}")
    @app.get("/v2/models/{model_name}/versions/{version}")
    async def metadata(model_name: str, version: str = "1"):
        known(model_name)
        return model.metadata

    @app.get("/v2/models/{model_name}/config")
    @app.get("/v2/models/{model_name}/versions/{version}/config")
    async def config(model_name: str, version: str = "1"):
        """Triton's model configuration extension: what perf_analyzer and Triton's clients ask first."""
        known(model_name)
        return model_config(model)

    @app.get("/v2/models/{model_name}/ready")
    @app.get("/v2/models/{model_name}/versions/{version}/ready")
    async def model_ready(model_name: str, version: str = "1"):
        known(model_name)
        return {"name": name, "ready": True}

    # the FastAPI app's own infer route (405 for other methods, and the app whole without server.Front)
    from starlette.routing import Route
    for path in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{version}/infer"):
        app.router.routes.append(Route(path, infer, methods=["POST"]))
