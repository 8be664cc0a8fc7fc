"""`lstm-export serve`: the streaming HTTP server (serving.server) from the command line."""
from __future__ import annotations

from dataclasses import fields

from lstm_export.common.errors import UserError

from .types import PORT, count, real

# the rule for each ServerConfig limit: every one positive (a zero batch would spin the batcher)
LIMITS = {"max_batch": count(1, 4096), "max_wait_ms": real(0, 10_000), "max_streams": count(1, 1_000_000),
          "idle_timeout_s": real(0, 10**7, low_open=True), "max_chunk": count(1, 10**7),
          "max_body_bytes": count(1, 10**10), "body_timeout_s": real(0, 3600, low_open=True),
          "max_generate": count(1, 10**6), "ort_threads": count(1, 1024)}

HELP = {"ort_threads": "ONNX Runtime's intra-op threads per run; more pay for batches of many rows or long "
                       "chunks, one leaves a core to the HTTP work "}


def add_command(sub) -> None:
    from lstm_export.serving.server import ServerConfig
    p = sub.add_parser("serve", help="serve a streaming ONNX model over HTTP (JSON, Prometheus metrics)")
    p.add_argument("model", help="MODEL.onnx exported with --mode streaming, or its folder from `compile`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=PORT, default=8000)
    p.add_argument("--grpc-port", type=PORT, default=None, metavar="P",
                   help="also serve the Open Inference Protocol over gRPC (Triton's GRPCInferenceService) on P")
    p.add_argument("--name", default=None,
                   help="the model's name in the Open Inference Protocol's /v2 routes (default: the file's stem)")
    p.add_argument("--state-key-file", default=None, metavar="FILE",
                   help="sign each stream's state into a state_token (v2 sequences), with the key in FILE "
                        "(else $LSTM_EXPORT_STATE_KEY; never a flag value): replicas then keep no stream state")
    p.add_argument("--replicas", type=count(1, 1024), default=1,
                   help="serve N replicas on Ray Serve (pip install -e '.[ray]'; needs a state key); default 1: "
                        "one process, no Ray")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local instance")
    p.add_argument("--ray-logs", action="store_true", help="show Ray's own start-up and serving logs")
    for f in fields(ServerConfig):  # one flag per limit, same name, same default
        if isinstance(f.default, bool):  # a switch: off unless given
            p.add_argument(f"--{f.name.replace('_', '-')}", action="store_true",
                           help="let ONNX Runtime's threads spin after each run (faster back-to-back calls, "
                                "cores taken from the server's other work)" if f.name == "ort_spinning" else None)
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", type=LIMITS.get(f.name, type(f.default)), default=f.default,
                       help=HELP.get(f.name, "") + f"(default: {f.default})")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from lstm_export.runtimes.source import open_model
    from lstm_export.serving.server import ServerConfig, create_app
    from lstm_export.serving.state_token import load_key
    source = open_model(args.model)  # read once; a missing or broken model fails here, before any socket opens
    cfg = ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})
    key = load_key(args.state_key_file)
    _check_port(args.host, args.port)  # before the model loads: uvicorn would exit 3 with a log line
    if args.grpc_port is not None:
        if args.grpc_port == args.port:
            raise UserError(f"--grpc-port {args.grpc_port} is --port too: give gRPC a port of its own")
        _check_port(args.host, args.grpc_port)
    if args.replicas > 1 or args.ray_address:
        if args.grpc_port is not None:
            raise UserError("--grpc-port serves from this process; with --replicas or --ray-address only HTTP "
                            "is served: leave --grpc-port out")
        from lstm_export.serving import ray_serve
        from lstm_export.serving.server import _model_name
        name = args.name or _model_name(source)
        print(f"serving {args.model} as {name!r} on http://{args.host}:{args.port} with {args.replicas} Ray Serve "
              f"replica(s) ({'cluster ' + args.ray_address if args.ray_address else 'a local Ray instance'})",
              flush=True)
        ray_serve.run(source, cfg, name, key, args.replicas, args.host, args.port, args.ray_address, args.ray_logs)
        return 0
    grpc_address = f"{args.host}:{args.grpc_port}" if args.grpc_port is not None else None
    app = create_app(source, cfg, name=args.name, state_key=key, grpc_address=grpc_address)
    print(f"serving {args.model} on http://{args.host}:{args.port}"
          + (f" and grpc://{grpc_address}" if grpc_address else "")
          + f" with {cfg.runtime} (max batch {cfg.max_batch}, wait {cfg.max_wait_ms} ms)", flush=True)
    # uvicorn's server (uvloop) with serving.http11's connection protocol, which answers the infer
    # route itself: per request, uvicorn's own protocol cost a fifth of the server's CPU (docs/serving.md)
    from lstm_export.serving.http11 import run
    run(app, args.host, args.port)
    return 0


def _check_port(host: str, port: int) -> None:
    import socket

    from lstm_export.common.errors import UserError
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host!r} does not resolve ({e.strerror}); e.g. --host 127.0.0.1") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None
