"""Scale-out on Ray Serve: N replicas of the same FastAPI app behind Ray's HTTP proxy, on a local Ray
instance or a cluster (`lstm-export serve MODEL --replicas N [--ray-address ADDR]`).

Each replica builds its own app (its own runtime session) from the model's bytes, which travel with
the deployment, so no node needs the file. With a state key, every v2 sequence's state leaves with
each response as a signed token and any replica continues it (state_token.py); without one, a
sequence must stay on the replica that holds it, which Ray's router does not promise: --replicas
needs a key. The key reaches the replicas through Ray's object store, never a command line.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from lstm_export.common.errors import UserError


class _Replica:
    """One replica: writes the model it was given to a private folder and serves it."""

    def __init__(self, model_bytes: bytes, filename: str, cfg, name: str, key: bytes):
        self._dir = tempfile.mkdtemp(prefix="lstm-export-replica-")
        path = Path(self._dir) / filename
        path.write_bytes(model_bytes)
        self._args = (str(path), cfg, name, key)

    def __serve_build_asgi_app__(self):
        from .server import create_app
        path, cfg, name, key = self._args
        return create_app(path, cfg, name=name, state_key=key)


def deployment(source, cfg, name: str, key: bytes, replicas: int):
    """The Ray Serve application (a bound deployment) serving `source` on `replicas` replicas."""
    from ray import serve
    if source.compiled is not None:
        raise UserError(f"--replicas serves an .onnx file; {source.path} is a compiled folder "
                        "(serve its model.onnx, or run one process per machine)")
    cls = serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0})(serve.ingress()(
        type("LstmExportReplica", (_Replica,), {})))
    return cls.bind(source.onnx_path.read_bytes(), source.onnx_path.name, cfg, name, key)


def run(source, cfg, name: str, key: bytes | None, replicas: int, host: str, port: int,
        address: str | None = None, show_logs: bool = False, blocking: bool = True) -> None:
    """Starts (or joins, with `address`) Ray and runs the deployment on host:port."""
    if key is None:
        raise UserError("--replicas needs a state key (--state-key-file FILE or $LSTM_EXPORT_STATE_KEY): a "
                        "stream's state then travels in signed tokens, and any replica continues it")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserError("--replicas runs on Ray Serve, which is not installed: pip install -e '.[ray]'") from None
    level = logging.INFO if show_logs else logging.ERROR
    for logger in ("ray", "ray.serve"):
        logging.getLogger(logger).setLevel(level)
    ray.init(address=address, include_dashboard=False, logging_level=level, log_to_driver=show_logs,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_project_paths())}})
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": logging.getLevelName(level)})
    serve.run(deployment(source, cfg, name, key, replicas), name="lstm-export", route_prefix="/", blocking=False)
    if blocking:
        _wait_for_a_signal()


def _wait_for_a_signal() -> None:
    """Serves until SIGINT or SIGTERM, then takes the deployment and Ray down cleanly. Our handlers
    replace the one Ray's C++ core installs, which prints a stack dump on SIGTERM."""
    import signal
    import threading
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    shutdown()


def shutdown() -> None:
    import ray
    from ray import serve
    serve.shutdown()
    ray.shutdown()


def _project_paths() -> list[str]:
    """Where this project's packages are, for the replicas' interpreters (an editable install
    already puts them on sys.path there; a plain checkout does not)."""
    root = str(Path(__file__).resolve().parent.parent)
    return [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
