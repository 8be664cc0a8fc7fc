"""The Open Inference Protocol over gRPC: Triton's (KServe v2's) `GRPCInferenceService`, for Triton's
gRPC clients and tools, on `serve --grpc-port P` beside HTTP.

The service definitions are the ones `tritonclient[grpc]` ships compiled (service_pb2,
model_config_pb2), so a Triton client and this server read the same messages. Each request is put
into the HTTP form (a JSON-like body and the binary bytes after it) and answered by the same
V2Model as HTTP (oip.py): the same sequence parameters (ids numeric and string, start, end), state
tokens, strictness, limits and micro-batcher, on the same event loop. Tensors travel as
`raw_input_contents` / `raw_output_contents`, or typed `contents` on the way in.

Errors are the gRPC status matching the HTTP one (INVALID_ARGUMENT for a 400, NOT_FOUND for a 404,
...) with the same one-line message. On `ModelStreamInfer` a refused request is answered on the
stream with `error_message`, as Triton does, and the stream goes on; a stream that breaks closes
nothing but its own unfinished call.
"""
from __future__ import annotations

from lstm_export.common.errors import describe

from .oip import V2Model, model_config
from .streaming import StreamError
from .v2_tensors import V2Error

# a typed contents field per datatype (InferTensorContents)
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}


# gRPC status codes (grpc/status.h) by the HTTP status of the same refusal
OK, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS = 0, 3, 4, 5, 6
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 8, 12, 13, 14
STATUS = {400: INVALID_ARGUMENT, 404: NOT_FOUND, 408: DEADLINE_EXCEEDED, 409: ALREADY_EXISTS,
          413: RESOURCE_EXHAUSTED, 429: RESOURCE_EXHAUSTED, 503: UNAVAILABLE}


class GrpcError(Exception):
    """A call's failure: its gRPC status code and one-line message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _status(http_status: int) -> int:
    return STATUS.get(http_status, INTERNAL if http_status >= 500 else INVALID_ARGUMENT)


# Triton's gRPC clients (perf_analyzer among them) ask whether a decoupled model's stream ends with an
# empty response; each request here has one response, which is the final one and says so
FINAL = "triton_enable_empty_final_response"


def request_body(req) -> tuple[dict, bytes]:
    """A ModelInferRequest in the HTTP form V2Model.begin takes: (body, binary bytes). Every output
    is asked for as binary (gRPC answers in raw_output_contents). Triton's FINAL parameter, a bool,
    is gRPC's business and not the model's: taken off here (infer marks the response final)."""
    params = {k: _param(v) for k, v in req.parameters.items()}
    if isinstance(params.get(FINAL), bool):
        del params[FINAL]
    if isinstance(params.get("binary_data_output", True), bool):  # gRPC's outputs are raw bytes, always
        params["binary_data_output"] = True  # (not a bool: left for V2Model to refuse, as on HTTP)
    inputs, blob = [], b""
    if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
        raise V2Error(400, f"{len(req.raw_input_contents)} raw_input_contents for {len(req.inputs)} inputs: "
                           "send one per input, or typed contents")
    for k, t in enumerate(req.inputs):
        d = {"name": t.name, "datatype": t.datatype, "shape": [int(s) for s in t.shape]}
        if req.raw_input_contents:
            raw = req.raw_input_contents[k]
            d["parameters"] = {"binary_data_size": len(raw)}
            blob += raw
        else:
            field = CONTENTS.get(t.datatype)
            values = list(getattr(t.contents, field)) if field else []
            d["data"] = [bool(v) for v in values] if t.datatype == "BOOL" else values
        inputs.append(d)
    body = {"inputs": inputs, "parameters": params}
    if req.id:
        body["id"] = req.id
    if req.outputs:
        body["outputs"] = [{"name": o.name} for o in req.outputs]
    return body, blob


def _param(p):
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _set_param(msg_params, key: str, value) -> None:
    p = msg_params[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    else:
        p.string_param = str(value)


def response_message(pb, response: dict, blobs: list[bytes]):
    """V2Model.end's answer as a ModelInferResponse."""
    msg = pb.ModelInferResponse(model_name=response["model_name"], model_version=response["model_version"],
                                id=response.get("id", ""))
    for t in response["outputs"]:
        msg.outputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
    msg.raw_output_contents.extend(blobs)
    for key, value in response.get("parameters", {}).items():
        _set_param(msg.parameters, key, value)
    return msg


class Service:
    """GRPCInferenceService for `model`, on serialized messages, whatever carries them (grpc_h2.py):
    `call(method, request bytes)` answers the health, metadata and config methods or raises
    GrpcError; `infer_soon` answers ModelInfer and each ModelStreamInfer message on HTTP's
    hot path, a refusal or failure on a stream as error_message, as Triton does. Everything runs on
    the event loop of the HTTP server (the micro-batcher's)."""

    STREAM = "ModelStreamInfer"

    def __init__(self, model: V2Model, version: str):
        from google.protobuf import json_format
        from tritonclient.grpc import model_config_pb2
        from tritonclient.grpc import service_pb2 as pb
        self.model, self.pb = model, pb
        config = pb.ModelConfigResponse(config=json_format.ParseDict(model_config(model),
                                                                     model_config_pb2.ModelConfig()))
        meta = model.metadata
        tensors = [pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                   for t in meta["inputs"] + meta["outputs"]]
        metadata = pb.ModelMetadataResponse(name=model.name, versions=meta["versions"], platform=meta["platform"],
                                            inputs=tensors[:1], outputs=tensors[1:])
        server = pb.ServerMetadataResponse(name="lstm-export", version=version,
                                           extensions=["binary_tensor_data", "parameters", "sequence",
                                                       "model_configuration"])
        # method -> (request type, the answer: a fixed message, or a function of the request)
        self.fixed = {"ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse(live=True).SerializeToString()),
                      "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse(ready=True).SerializeToString()),
                      "ServerMetadata": (pb.ServerMetadataRequest, server.SerializeToString())}
        self.per_model = {"ModelMetadata": (pb.ModelMetadataRequest, metadata.SerializeToString()),
                          "ModelConfig": (pb.ModelConfigRequest, config.SerializeToString())}

    async def call(self, method: str, data: bytes) -> bytes:
        pb = self.pb
        if method in self.fixed:
            self._parse(self.fixed[method][0], data)
            return self.fixed[method][1]
        if method in self.per_model:
            request = self._parse(self.per_model[method][0], data)
            self._known(request.name)
            return self.per_model[method][1]
        if method == "ModelReady":
            request = self._parse(pb.ModelReadyRequest, data)
            return pb.ModelReadyResponse(ready=request.name == self.model.name).SerializeToString()
        raise GrpcError(UNIMPLEMENTED, f"{method} is not served here (inference.GRPCInferenceService: health, "
                                       "metadata, config, ModelInfer, ModelStreamInfer)")

    def infer_soon(self, data: bytes, reply, stream: bool = False) -> None:
        """ModelInfer (or, with `stream`, one ModelStreamInfer message) without a coroutine, as HTTP's
        hot path answers (oip.V2Infer.answer_soon): checked now, its chunk queued for this loop turn's
        batch, and reply(answer bytes, None) or reply(None, GrpcError) called once, at once for a
        refusal, else from the batch run. On a stream a refusal or failure is the answer's
        error_message instead."""
        pb, rid = self.pb, ""
        try:
            request = self._parse(pb.ModelInferRequest, data)
            rid = request.id
            if request.model_name != self.model.name:
                raise V2Error(404, f"unknown model {request.model_name!r}; this server serves {self.model.name!r}")
            call = self.model.begin(*request_body(request))
        except Exception as e:  # noqa: BLE001 -- refused: answered now, in the protocol's shape
            return reply(*self._failed(e, rid, stream))

        def done(outs, error):
            try:
                response, blobs = self.model.end(call, outs, error)
                msg = response_message(pb, response, blobs)
                if FINAL in request.parameters:  # one response a request: this one is the last
                    msg.parameters["triton_final_response"].bool_param = True
                answer = pb.ModelStreamInferResponse(infer_response=msg) if stream else msg
            except Exception as e:  # noqa: BLE001 -- the session's refusal, or the runtime's failure
                return reply(*self._failed(e, rid, stream))
            reply(answer.SerializeToString(), None)

        try:
            self.model.session.submit(call.sid, call.chunk, done)
        except Exception as e:  # noqa: BLE001 -- the session refused the chunk: closed as after a run
            done(None, e)

    def _failed(self, e: Exception, rid: str, stream: bool):
        """(answer bytes, None) on a stream, else (None, GrpcError): a refusal's status, else INTERNAL."""
        if isinstance(e, GrpcError):
            code, why = e.code, str(e)
        elif isinstance(e, (V2Error, StreamError)):
            code, why = _status(e.status), str(e)
        else:
            code, why = INTERNAL, describe(e)
        if not stream:
            return None, GrpcError(code, why)
        pb = self.pb
        return pb.ModelStreamInferResponse(error_message=why,
                                           infer_response=pb.ModelInferResponse(id=rid)).SerializeToString(), None

    @staticmethod
    def _parse(kind, data: bytes):
        try:
            return kind.FromString(data)
        except Exception as e:  # noqa: BLE001 -- protobuf's DecodeError: a request that is not the message
            raise GrpcError(INVALID_ARGUMENT, f"the request is not a {kind.__name__}: {describe(e)}") from None

    def _known(self, name: str) -> None:
        if name != self.model.name:
            raise GrpcError(NOT_FOUND, f"unknown model {name!r}; this server serves {self.model.name!r}")
