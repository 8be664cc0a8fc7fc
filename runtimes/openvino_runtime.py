"""openvino: Intel's OpenVINO runtime on the CPU (optional peer: pip install 'lstm-export[peers]')."""
from __future__ import annotations

import importlib.util

import numpy as np

from lstm_export.errors import UserError

from .base import Availability, Runtime
from .model_io import load_onnx


class OpenVinoRuntime(Runtime):
    name = "openvino"

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self.request = None

    @classmethod
    def availability(cls) -> Availability:
        if importlib.util.find_spec("openvino") is None:
            return Availability(False, "openvino is not installed (pip install 'lstm-export[peers]')")
        return Availability(True)

    def prepare(self, model) -> None:
        import openvino as ov
        proto = load_onnx(model)
        core = ov.Core()
        # f32 throughout: on CPUs with bf16 support OpenVINO otherwise computes in bf16 by default.
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        try:
            compiled = core.compile_model(core.read_model(str(model)), "CPU", config)
        except Exception as e:
            raise UserError(f"openvino cannot load {model}: {str(e).strip().splitlines()[0][:200]}") from None
        self.request = compiled.create_infer_request()
        self.input_names = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
        self.output_names = [o.name for o in proto.graph.output]
        self.compiled = compiled

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer({n: feeds[n] for n in self.input_names})
        by_name = {}
        for port, value in results.items():
            for n in port.get_names():
                by_name[n] = value
        return {n: np.asarray(by_name[n]) for n in self.output_names}

    def release(self) -> None:
        self.request = None
