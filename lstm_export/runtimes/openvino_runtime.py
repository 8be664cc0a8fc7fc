"""openvino: Intel's OpenVINO runtime on the CPU (optional peer: pip install 'lstm-export[peers]')."""
from __future__ import annotations

import importlib.util

import numpy as np

from lstm_export.common.errors import first_line

from .base import Availability, Runtime, RuntimeFailure


class OpenVinoRuntime(Runtime):
    name = "openvino"
    OPTIONS = ("threads",)

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self.request = None

    @classmethod
    def availability(cls) -> Availability:
        if importlib.util.find_spec("openvino") is None:
            return Availability(False, "openvino is not installed (pip install 'lstm-export[peers]')")
        return Availability(True)

    hint = "f32"  # f32 throughout: on CPUs with bf16 support OpenVINO otherwise computes in bf16

    def _prepare(self, source) -> None:
        import openvino as ov
        source.onnx()  # a compiled folder without its ONNX is refused here, in one line
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": self.hint} if self.hint else {}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        try:
            compiled = core.compile_model(core.read_model(str(source.onnx_path)), "CPU", config)
        except Exception as e:
            raise RuntimeFailure(f"openvino cannot load {source.path}: {first_line(e, 200)}") from None
        self.request = compiled.create_infer_request()
        used = str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower()  # "<Type: 'bfloat16'>", 'float32'
        self.precision = "bf16" if "bf" in used else "fp16" if "16" in used else "fp32"
        self.input_names, self.output_names = source.input_names, source.output_names
        self.compiled = compiled

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer({n: feeds[n] for n in self.input_names})
        by_name = {}
        for port, value in results.items():
            for n in port.get_names():
                by_name[n] = value
        return {n: np.asarray(by_name[n]) for n in self.output_names}

    def _release(self) -> None:
        self.request = None


class OpenVinoDefaultRuntime(OpenVinoRuntime):
    """OpenVINO as it comes: no precision hint, so bf16 on CPUs with bf16 (AVX512-BF16, AMX) and f32
    elsewhere; `precision` says which it took."""

    name = "openvino-default"
    hint = None
