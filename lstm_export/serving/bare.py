"""The baseline `serve` is measured against: a bare Starlette endpoint that runs the same ONNX
Runtime session (same graph, same options: spinning off) inline in the request, one request at a
time, for the v2 infer route with Triton's sequence parameters, keeping each sequence's (h, c) in a
dict. No validation beyond what the happy path needs, no batching, no metrics: what a user would
write in ten minutes, and so the cost floor of HTTP + JSON + one ORT run on this machine.

Run: python -m lstm_export.serving.bare MODEL.streaming.onnx --port PORT (the load test starts it).
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def bare_app(model_path: str, name: str = "lm.streaming"):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from lstm_export.runtimes.ort import OrtCpuRuntime
    from lstm_export.runtimes.source import open_model
    from .server import ServerConfig
    cfg = ServerConfig()  # the runtime and options `serve` gives its session by default
    rt = OrtCpuRuntime(spin=cfg.ort_spinning, threads=cfg.ort_threads)
    rt.prepare(open_model(model_path))
    session = rt.session  # called directly: the bare endpoint skips even the runner's feed checks
    h0 = next(i for i in session.get_inputs() if i.name == "h_0").shape  # (L, batch, H)
    zero = np.zeros((h0[0], 1, h0[2]), np.float32)
    states: dict = {}
    out_name = session.get_outputs()[0].name

    async def infer(request):
        body = json.loads(await request.body())
        t = body["inputs"][0]
        p = body.get("parameters", {})
        seq = p.get("sequence_id")
        h, c = (zero, zero) if p.get("sequence_start") or seq not in states else states[seq]
        y, h, c = session.run(None, {t["name"]: np.array(t["data"], np.int64).reshape(t["shape"]), "h_0": h, "c_0": c})
        if p.get("sequence_end"):
            states.pop(seq, None)
        elif seq is not None:
            states[seq] = (h, c)
        return JSONResponse({"model_name": name, "outputs": [
            {"name": out_name, "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}]})

    async def ready(request):
        return Response("{}", media_type="application/json")

    return Starlette(routes=[Route(f"/v2/models/{name}/infer", infer, methods=["POST"]),
                             Route("/v2/health/ready", ready)])


if __name__ == "__main__":
    import uvicorn
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", default="lm.streaming")
    args = ap.parse_args()
    uvicorn.run(bare_app(args.model, args.name), host="127.0.0.1", port=args.port, log_level="warning")
