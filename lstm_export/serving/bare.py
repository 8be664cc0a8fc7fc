"""The baseline `serve` is measured against: a bare Starlette endpoint that runs the same ONNX
Runtime session (same graph, same options as serve's defaults) inline in the request, one request
at a time, for the v2 infer route with Triton's sequence parameters, keeping each sequence's (h, c)
in a dict; JSON tensors, or binary ones (the binary tensor extension) answered in binary. No
validation beyond what the happy path needs, no batching, no metrics: what a user would write in
ten minutes, and so the cost floor of HTTP + JSON + one ORT run on this machine.

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
        raw = await request.body()
        n = request.headers.get("inference-header-content-length")  # the binary tensor extension
        body = json.loads(raw[:int(n)] if n else raw)
        t = body["inputs"][0]
        x = (np.frombuffer(raw, np.int64, offset=int(n)) if n else np.array(t["data"], np.int64)).reshape(t["shape"])
        p = body.get("parameters", {})
        seq = p.get("sequence_id")
        h, c = (zero, zero) if p.get("sequence_start") or seq not in states else states[seq]
        y, h, c = session.run(None, {t["name"]: x, "h_0": h, "c_0": c})
        if p.get("sequence_end"):
            states.pop(seq, None)
        elif seq is not None:
            states[seq] = (h, c)
        out = {"name": out_name, "datatype": "FP32", "shape": list(y.shape)}
        if not n:
            out["data"] = y.ravel().tolist()
            return JSONResponse({"model_name": name, "outputs": [out]})
        out["parameters"] = {"binary_data_size": y.nbytes}
        head = json.dumps({"model_name": name, "outputs": [out]}).encode()
        return Response(head + y.tobytes(), media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(head))})

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
    # uvicorn as `serve` runs it, so that what differs is the two apps
    uvicorn.run(bare_app(args.model, args.name), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, proxy_headers=False)
