"""ONNX Runtime backends: ort-cpu and ort-cuda (which proves where each node ran)."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from lstm_export.common.errors import UserError, first_line

from .base import Availability, Runtime, RuntimeFailure


def ort_message(e: Exception) -> str:
    """ORT's error text without its '[ONNXRuntimeError] : 1 : FAIL :' prefix and C++ source location."""
    s = first_line(e, 10**6)
    s = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", s)
    s = re.sub(r"^/onnxruntime_src/\S+ [^(]*\(.*?\) (?=[A-Z])", "", s)
    return s[:300]


def node_placements(profile_json: str | Path) -> dict[str, tuple[str, str]]:
    """Parses an ORT profile: node name -> (op type, execution provider it actually ran on)."""
    events = json.loads(Path(profile_json).read_text())
    out = {}
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") == "Node" and "provider" in args:
            out[ev["name"].removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")] = \
                (args.get("op_name", "?"), args["provider"])
    return out


def check_on_cuda(placements: dict[str, tuple[str, str]], ops: tuple[str, ...] = ("LSTM",)) -> None:
    """Refuses to call a run 'CUDA' when any of `ops` ran on another provider."""
    fell_back = sorted(f"{n} ({op} on {prov})" for n, (op, prov) in placements.items()
                       if op in ops and prov != "CUDAExecutionProvider")
    if fell_back:
        raise UserError(f"ort-cuda: {len(fell_back)} node(s) fell back from CUDA: {', '.join(fell_back)}; "
                        "this is not a CUDA run (check onnxruntime-gpu's support for the op and dtype)")


class OrtCpuRuntime(Runtime):
    """ONNX Runtime on the CPU execution provider."""
    name = "ort-cpu"
    OPTIONS = ("threads", "spin")
    providers = ["CPUExecutionProvider"]

    def __init__(self, threads: int | None = None, optimize: bool = True, spin: bool = True):
        """spin=False: the pool's threads sleep as soon as a run ends. ORT's default spins them for a
        while after each run, which is fastest for back-to-back calls but takes the cores a server's
        other work (HTTP, JSON, the next request) needs; serving turns it off."""
        self.threads, self.optimize, self.spin = threads, optimize, spin
        self.session = None
        self.placements: dict[str, tuple[str, str]] = {}

    @classmethod
    def availability(cls) -> Availability:
        try:
            import onnxruntime
        except ImportError:
            return Availability(False, "onnxruntime is not installed (pip install onnxruntime)")
        missing = [p for p in cls.providers if p not in onnxruntime.get_available_providers()]
        if missing:
            return Availability(False, f"onnxruntime {onnxruntime.__version__} has no {missing[0]}")
        return Availability(True)

    def _options(self, profile_prefix: str | None = None):
        import onnxruntime as ort
        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        if not self.spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if not self.optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 4  # fatal only: a failed run is raised (and reported once) by us, not logged
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        return so

    def _prepare(self, source) -> None:
        import onnxruntime as ort
        proto = source.onnx()
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), self._options(), providers=self.providers)
        except Exception as e:
            raise RuntimeFailure(f"{self.name} cannot load {source.path}: {ort_message(e)}") from None
        self._proto = proto
        # read once: get_outputs() builds its NodeArg objects anew on every call (60 us a run)
        self._output_names = [o.name for o in self.session.get_outputs()]

    def profile_placements(self, feeds: dict[str, np.ndarray]) -> dict[str, tuple[str, str]]:
        """Runs once with profiling on and returns node -> (op, provider) as actually executed."""
        import onnxruntime as ort
        with tempfile.TemporaryDirectory() as d:
            sess = ort.InferenceSession(self._proto.SerializeToString(),
                                        self._options(os.path.join(d, "ort")), providers=self.providers)
            sess.run(None, feeds)
            self.placements = node_placements(sess.end_profiling())
        return self.placements

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outs = self.session.run(None, feeds)
        except Exception as e:
            raise RuntimeFailure(f"{self.name} failed to run: {ort_message(e)}") from None
        return dict(zip(self._output_names, outs))

    def _release(self) -> None:
        self.session = None


def _has_vnni() -> bool:
    """Whether this CPU has an int8 dot-product instruction ORT's quantized kernels use."""
    from .tvm_lstm import cpu_flags
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


class OrtInt8Runtime(OrtCpuRuntime):
    """ONNX Runtime on the model dynamically quantized by onnxruntime.quantization (int8 weights,
    activations quantized per call; LSTM nodes become DynamicQuantizeLSTM), as its docs suggest
    for RNNs on CPU."""

    name = "ort-cpu-int8"
    precision = "int8"

    def _prepare(self, source) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        source.onnx()
        import logging
        with tempfile.TemporaryDirectory(prefix="lstm-export-int8-") as d:
            out = Path(d) / "int8.onnx"
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)  # its advice to pre-process, on the root logger: no console noise
            try:
                # Without VNNI, ORT's u8s8 kernels add pairs of u8*s8 products in int16 (VPMADDUBSW),
                # which saturates: ORT's docs prescribe 7-bit weights (reduce_range) there. Measured on
                # the AMD EPYC Zen 3 VM (AVX2): the contract model's logits were 0.165 off with 8 bits.
                quantize_dynamic(str(source.onnx_path), str(out), weight_type=QuantType.QInt8,
                                 reduce_range=not _has_vnni())
            except Exception as e:
                raise RuntimeFailure(f"{self.name}: onnxruntime.quantization cannot quantize {source.path}: "
                                     f"{ort_message(e)}") from None
            finally:
                root.setLevel(level)
            from .source import open_model
            super()._prepare(open_model(out))  # read into memory here: the folder may go


class OrtCudaRuntime(OrtCpuRuntime):
    """ONNX Runtime on CUDA; `prepare` proves the LSTM nodes run on the CUDA provider."""

    name = "ort-cuda"
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]

    @classmethod
    def availability(cls) -> Availability:
        try:
            import onnxruntime
        except ImportError:
            return Availability(False, "onnxruntime is not installed (pip install 'lstm-export[gpu]')")
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return Availability(False, f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider "
                                       "(install the gpu extra: pip install 'lstm-export[gpu]')")
        if not _cuda_device_present():
            return Availability(False, "no CUDA device")
        return Availability(True)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.placements:
            check_on_cuda(self.profile_placements(feeds))
        return super()._run(feeds)


def _cuda_device_present() -> bool:
    if Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists():
        return True
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES")) and Path("/dev/nvidia0").exists()
