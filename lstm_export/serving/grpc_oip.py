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


def _status(code: int):
    import grpc
    return {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
            408: grpc.StatusCode.DEADLINE_EXCEEDED, 409: grpc.StatusCode.ALREADY_EXISTS,
            413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
            503: grpc.StatusCode.UNAVAILABLE}.get(code, grpc.StatusCode.INTERNAL if code >= 500
                                                  else grpc.StatusCode.INVALID_ARGUMENT)


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


def make_servicer(model: V2Model, version: str):
    """The GRPCInferenceService implementation for `model` (grpc.aio: the coroutines run on the
    event loop the server was started on, which must be the HTTP server's: the micro-batcher's)."""
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

    config = json_format.ParseDict(model_config(model), model_config_pb2.ModelConfig())
    meta = model.metadata

    def known(name: str):
        if name != model.name:
            return f"unknown model {name!r}; this server serves {model.name!r}"
        return None

    async def infer(request):
        if request.model_name != model.name:
            raise V2Error(404, f"unknown model {request.model_name!r}; this server serves {model.name!r}")
        body, blob = request_body(request)
        response, blobs = await model.infer(body, blob)
        msg = response_message(service_pb2, response, blobs)
        if FINAL in request.parameters:  # one response a request: this one is the last
            msg.parameters["triton_final_response"].bool_param = True
        return msg

    class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ServerLive(self, request, context):
            return service_pb2.ServerLiveResponse(live=True)

        async def ServerReady(self, request, context):
            return service_pb2.ServerReadyResponse(ready=True)

        async def ModelReady(self, request, context):
            return service_pb2.ModelReadyResponse(ready=request.name == model.name)

        async def ServerMetadata(self, request, context):
            return service_pb2.ServerMetadataResponse(name="lstm-export", version=version,
                                                      extensions=["binary_tensor_data", "parameters", "sequence",
                                                                  "model_configuration"])

        async def ModelMetadata(self, request, context):
            why = known(request.name)
            if why:
                await context.abort(grpc.StatusCode.NOT_FOUND, why)
            tensors = [service_pb2.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"],
                                                                         shape=t["shape"])
                       for t in meta["inputs"] + meta["outputs"]]
            return service_pb2.ModelMetadataResponse(name=model.name, versions=meta["versions"],
                                                     platform=meta["platform"], inputs=tensors[:1],
                                                     outputs=tensors[1:])

        async def ModelConfig(self, request, context):
            why = known(request.name)
            if why:
                await context.abort(grpc.StatusCode.NOT_FOUND, why)
            return service_pb2.ModelConfigResponse(config=config)

        async def ModelInfer(self, request, context):
            try:
                return await infer(request)
            except (V2Error, StreamError) as e:
                await context.abort(_status(e.status), str(e))
            except Exception as e:  # noqa: BLE001 -- the runtime's failure: INTERNAL in one line, as HTTP's 500
                await context.abort(grpc.StatusCode.INTERNAL, describe(e))

        async def ModelStreamInfer(self, request_iterator, context):
            # one call at a time, in order: a stream's requests are one sequence's chunks. read() and
            # write() on the context, not an async generator: one coroutine hop less a message
            while (request := await context.read()) is not grpc.aio.EOF:
                try:
                    answer = service_pb2.ModelStreamInferResponse(infer_response=await infer(request))
                except Exception as e:  # noqa: BLE001 -- refused or failed: said on the stream, which goes on
                    why = str(e) if isinstance(e, (V2Error, StreamError)) else describe(e)
                    answer = service_pb2.ModelStreamInferResponse(
                        error_message=why, infer_response=service_pb2.ModelInferResponse(id=request.id))
                await context.write(answer)

    return Servicer()


async def start(model: V2Model, address: str, version: str):
    """A grpc.aio server for `model` on `address` (host:port), started on the running loop."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(make_servicer(model, version), server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address} for gRPC")
    await server.start()
    return server
