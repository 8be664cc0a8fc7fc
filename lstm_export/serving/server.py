"""HTTP serving of a streaming ONNX LSTM: the app (an ASGI callable), JSON bodies, Prometheus metrics.

The app is front.Front: the v2 infer POST answered at the edge (oip.V2Infer, batched on the event
loop), everything else a FastAPI app whose sync routes (/v1 feeds, generation) run in worker
threads, so a long generation never holds the loop. `serve` runs it on uvicorn's server with
http11's connection protocol; any ASGI server (uvicorn's own protocol, Ray Serve, a test client)
runs it as well. Every error is JSON with a 4xx status ({"error": {"code", "message"}} on /v1,
{"error": message} on /v2); nothing a client sends can take the server down for the others.
"""
import contextlib
from dataclasses import dataclass

import numpy as np

from lstm_export.charlm import sample_id

from .bodies import BodyError, dumps, json_object, v1_error, v2_error
from .front import BodyLimits, Front
from .streaming import StreamError, StreamingSession


@dataclass
class ServerConfig:
    """Limits and batching; every field is a `lstm-export serve` flag of the same name."""

    runtime: str = "ort-cpu"
    max_batch: int = 16
    max_wait_ms: float = 0.0
    max_streams: int = 256
    idle_timeout_s: float = 300.0
    max_chunk: int = 1024
    max_body_bytes: int = 1_000_000
    body_timeout_s: float = 10.0
    max_generate: int = 2000
    ort_spinning: bool = False
    # ONNX Runtime's intra-op threads. One: a pool wakes its threads for every run (275 us of CPU
    # against 169 for one thread at one row, Zen 4), and the event loop needs a core of its own;
    # more pay for batches of more than ~8 rows or long chunks (docs/serving.md)
    ort_threads: int = 1


def create_app(model, cfg: ServerConfig | None = None, name: str | None = None, state_key: bytes | None = None,
               grpc_address: str | None = None):
    """The ASGI app serving one streaming model: the /v1 routes (module docstring) and the Open
    Inference Protocol's /v2 routes (oip.py) under `name` (default: the model file's stem), with
    signed state tokens when `state_key` is given; with `grpc_address` (host:port), the protocol's
    gRPC service too (grpc_oip.py), started on the app's event loop when the app starts."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import PlainTextResponse, Response
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = cfg or ServerConfig()
    session = StreamingSession(model, cfg.runtime, cfg.max_batch, cfg.max_wait_ms, cfg.max_streams,
                               cfg.idle_timeout_s, cfg.max_chunk, ort_spinning=cfg.ort_spinning,
                               ort_threads=cfg.ort_threads)
    registry = CollectorRegistry()  # one per app: no module-level state
    requests = Counter("lstm_requests_total", "HTTP requests", ["route", "status"], registry=registry)
    latency = Histogram("lstm_request_seconds", "request latency", ["route"], registry=registry,
                        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
    open_streams = Gauge("lstm_open_streams", "open streams", registry=registry)
    open_streams.set_function(lambda: session.open_streams)
    batch_rows = Gauge("lstm_batched_rows_total", "chunks run, summed over batches", registry=registry)
    batch_rows.set_function(lambda: session.stats.rows)
    batches = Gauge("lstm_batches_total", "batched runtime calls", registry=registry)
    batches.set_function(lambda: session.stats.batches)
    @contextlib.asynccontextmanager
    async def lifespan(app):
        grpc_server = None
        if grpc_address:
            from lstm_export import __version__

            from .grpc_h2 import start
            from .grpc_oip import Service
            host, _, port = grpc_address.rpartition(":")
            grpc_server = await start(Service(v2, __version__), host.strip("[]"), int(port))
        yield
        if grpc_server is not None:
            grpc_server.close()
        session.shutdown()

    app = FastAPI(title="lstm-export serve", version="1", lifespan=lifespan)
    app.state.session = session
    from .oip import V2Infer, V2Model, add_v2_routes
    v2 = V2Model(session, name or _model_name(session.source), state_key)
    infer = V2Infer(v2)
    add_v2_routes(app, v2, infer)
    children: dict = {}  # (route, status) -> the two metric children: labels() looks up under a lock

    def record(route: str, status: int, seconds: float) -> None:
        pair = children.get((route, status))
        if pair is None:  # routes and statuses are bounded sets: so is this dict
            pair = children[route, status] = (requests.labels(route, str(status)), latency.labels(route))
        pair[0].inc()
        pair[1].observe(seconds)

    @app.exception_handler(StreamError)
    async def stream_error(request, exc: StreamError):
        return v1_error(
            exc.status,
            "bad_request"
            if exc.status == 400
            else {404: "unknown_stream", 413: "too_large", 429: "too_many_streams"}.get(exc.status, "error"),
            str(exc),
        )

    @app.exception_handler(BodyError)
    async def body_error(request, exc: BodyError):  # in the error shape of the route's protocol
        if request.url.path.startswith("/v2"):
            return v2_error(400, str(exc))
        return v1_error(400, "malformed_json", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        # an unknown route or method: each protocol's error body, not FastAPI's {"detail": ...}
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += "; the routes are listed in docs/serving.md"
        if request.url.path.startswith("/v2"):
            return v2_error(exc.status_code, message)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return v1_error(exc.status_code, code, message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        at = " at " + where if where else ""
        return v1_error(400, "malformed_request", f"{first.get('msg', 'invalid request')}{at}")

    # health and metrics are async and never block: they answer while every worker thread is busy
    # with model work (a sync handler would queue behind generate requests)
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "open_streams": session.open_streams}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    description = {  # described once, from the source the session read: the model does not change while served
        "path": str(session.source.path), "runtime": session.runtime.name,
        "inputs": [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape)} for s in session.source.inputs],
        "outputs": [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape)} for s in session.source.outputs],
        "metadata": {k: v for k, v in session.metadata.items() if k != "lstm_export.vocab"},
        "vocab": session.vocab.chars if session.vocab else None, "limits": vars(cfg)}

    @app.get("/v1/model")
    def model_info():
        return description

    @app.post("/v1/streams", status_code=201)
    def open_stream():
        return {"stream_id": session.open()}

    @app.post("/v1/streams/{stream_id}")
    async def feed(stream_id: str, request: Request):
        body = json_object(await request.body())
        if "text" in body:
            if not isinstance(body["text"], str):
                return v1_error(400, "bad_request", "'text' must be a string")
            out = await run_in_threadpool(session.feed_text, stream_id, body["text"])
        elif "chunk" in body:
            try:
                chunk = np.asarray(body["chunk"])
            except (ValueError, TypeError):
                return v1_error(400, "bad_request", "'chunk' must be a rectangular array of numbers")
            if chunk.dtype == object or not (np.issubdtype(chunk.dtype, np.number)):
                return v1_error(400, "bad_request", "'chunk' must hold numbers")
            out = await run_in_threadpool(session.feed, stream_id, chunk)
        else:
            return v1_error(400, "bad_request", "send {'chunk': [...]} (token ids or features) or {'text': '...'}")
        # numpy straight to JSON bytes: FastAPI's encoder walks every float in Python (4 ms a request)
        return Response(dumps({"outputs": out}), media_type="application/json")

    @app.delete("/v1/streams/{stream_id}", status_code=204)
    def close_stream(stream_id: str):
        session.close(stream_id)
        return Response(status_code=204)

    @app.post("/v1/generate")
    async def generate(request: Request):
        body = json_object(await request.body())
        if session.vocab is None:
            return v1_error(400, "no_vocabulary", "this model carries no vocabulary; export a char LM checkpoint")
        req = _generate_request(body, cfg.max_generate)
        if isinstance(req, Response):
            return req
        return {"text": await run_in_threadpool(_generate, session, req.prime, req.chars, req.temperature, req.seed)}

    limits = dict(max_bytes=cfg.max_body_bytes, timeout_s=cfg.body_timeout_s, record=record)
    app.add_middleware(BodyLimits, **limits)
    front = Front(app, infer, limits)
    front.state = app.state  # app.state.session, as on the FastAPI app it fronts
    return front


def _model_name(source) -> str:
    """The name a model is served under by default: its file's stem (`lm.streaming.onnx` -> `lm.streaming`)."""
    path = source.onnx_path or source.path
    return path.name[:-len(".onnx")] if path.name.endswith(".onnx") else path.name


def _generate(session: StreamingSession, prime: str, chars: int, temperature: float, seed) -> str:
    """Feeds the prime on a private stream, then samples one character at a time."""
    rng = np.random.default_rng(seed)
    sid = session.open()
    try:
        out = session.feed_text(sid, prime)
        logits_name = session.output_names[0]
        ids = []
        for _ in range(chars):
            ids.append(sample_id(out[logits_name][-1], temperature, rng))  # from the last step's (V,) logits
            out = session.feed(sid, np.array([ids[-1]], np.int64))
        return prime + session.vocab.decode(ids)
    finally:
        session.close(sid)


def _generate_request(body: dict, max_generate: int):
    """/v1/generate's body checked against its schema: a GenerateRequest, or a 400 naming the field."""
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        prime: str = Field(min_length=1, max_length=10_000)
        chars: int = Field(200, ge=0, le=max_generate)
        temperature: float = Field(0.8, ge=0, le=100, allow_inf_nan=False)
        seed: int | None = Field(None, ge=0, lt=2**63)

    if isinstance(body.get("temperature"), int) and not isinstance(body["temperature"], bool):
        body = dict(body, temperature=float(body["temperature"]))  # 1 is as good a temperature as 1.0
    try:
        return GenerateRequest(**body)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(x) for x in first.get("loc", ())) or "body"
        return v1_error(400, "bad_request", f"'{field}': {first.get('msg', 'invalid')}")
