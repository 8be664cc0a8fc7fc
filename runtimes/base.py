"""The runtime interface and registry. Backends are imported only when asked for by name."""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lstm_export.errors import UserError


@dataclass(frozen=True)
class Availability:
    """Whether a runtime can run here; `reason` says why not (e.g. 'no CUDA device')."""

    ok: bool
    reason: str = "available"

    def __bool__(self) -> bool:
        return self.ok


class Runtime(ABC):
    """A backend: `prepare(model)` once, `run(feeds)` many times, `release()` at the end.

    Feeds and outputs are dicts of numpy arrays keyed by graph input / output name, outputs in
    graph order. Construction is cheap; heavy libraries are imported in `prepare`.
    """

    name: str = ""

    @classmethod
    @abstractmethod
    def availability(cls) -> Availability:
        """Can this runtime run on this machine? Never raises."""

    @abstractmethod
    def prepare(self, model: str | Path) -> None:
        """Loads (and compiles) the model; raises UserError when the model cannot run here."""

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs once; returns outputs keyed by name, in graph order."""

    def release(self) -> None:
        """Frees sessions and device memory; the runtime may be prepared again."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# name -> "module:Class"; modules are imported only when the runtime is asked for.
REGISTRY: dict[str, str] = {
    "torch": "runtimes.torch_runtime:TorchRuntime",
    "torch-nn": "runtimes.torch_runtime:TorchNNRuntime",
    "numpy-f64": "runtimes.numpy_reference:NumpyReferenceRuntime",
    "onnx-reference": "runtimes.onnx_reference:ReferenceRuntime",
    "ort-cpu": "runtimes.ort:OrtCpuRuntime",
    "ort-cuda": "runtimes.ort:OrtCudaRuntime",
    "tvm-llvm": "runtimes.tvm_runtime:TvmLlvmRuntime",
    "tvm-cuda": "runtimes.tvm_runtime:TvmCudaRuntime",
    "openvino": "runtimes.openvino_runtime:OpenVinoRuntime",
}
ONNX_RUNTIMES = ("onnx-reference", "ort-cpu", "ort-cuda", "tvm-llvm", "tvm-cuda", "openvino")  # run any ONNX file (torch* need a checkpoint)


def runtime_class(name: str) -> type[Runtime]:
    if name not in REGISTRY:
        raise UserError(f"unknown runtime {name!r}; choose one of {', '.join(REGISTRY)} "
                        "(`lstm-export runtimes` lists what is available here)")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_runtime(name: str, **kwargs) -> Runtime:
    """A fresh, unprepared runtime by name; raises UserError if unknown or unavailable here."""
    cls = runtime_class(name)
    avail = cls.availability()
    if not avail:
        raise UserError(f"runtime {name} is not available here: {avail.reason}")
    return cls(**kwargs)


def list_runtimes() -> dict[str, Availability]:
    """Every registered runtime with its availability on this machine."""
    out = {}
    for name in REGISTRY:
        try:
            out[name] = runtime_class(name).availability()
        except Exception as e:  # a broken optional install must not break the listing
            out[name] = Availability(False, f"{type(e).__name__}: {e}")
    return out
