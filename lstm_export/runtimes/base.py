"""The runtime interface and registry. Backends are imported only when asked for by name."""
from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from lstm_export.common.errors import UserError, describe


@dataclass(frozen=True)
class Availability:
    """Whether a runtime can run here; `reason` says why not (e.g. 'no CUDA device')."""

    ok: bool
    reason: str = "available"

    def __bool__(self) -> bool:
        return self.ok


class RuntimeFailure(UserError):
    """A backend failed to load or run a model: names the runtime and the first line of the cause.
    The one error type every backend's exceptions become, so callers (compare, bench, the CLI)
    handle one type whatever the backend."""


@contextlib.contextmanager
def _failures_named(runtime: str, doing: str):
    """UserErrors pass unchanged (they already say what to fix); any other Exception (MemoryError
    too) becomes one RuntimeFailure naming the runtime. KeyboardInterrupt is not an Exception."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        raise RuntimeFailure(f"{runtime} {doing}: {describe(e)}") from e


class Runtime(ABC):
    """A backend (Polygraphy's runner shape): `prepare(model)` once, `run(feeds)` many times,
    `release()` at the end.

    The public `prepare`/`run` are the contract: `prepare` takes an .onnx path, a compiled folder
    or a source.ModelSource, read once; `run` checks the feeds against the model's declared inputs
    (model_io.check_feeds) and returns outputs keyed by graph output name, in graph order. Any
    backend exception becomes a RuntimeFailure naming the runtime. Backends implement `_prepare`
    and `_run` only. Construction is cheap; heavy libraries are imported in `_prepare`.
    """

    name: str = ""
    needs_model = True  # False: runs our model from a checkpoint; the ONNX model then only names feeds
    source = None  # the prepared model's source.ModelSource (None for a model-less prepare)
    _prepared = False
    allow_nonfinite = False  # NaN/Inf inputs are refused unless set (instance attribute or prepare's flag)
    # what the runtime computes in: "fp32", "bf16" or "int8" (weights); compare derives its tolerance
    # from it (common.agreement.PRECISION_TOLERANCE). Known after prepare for runtimes that choose.
    precision = "fp32"
    # the RuntimeOptions fields this class's constructor takes (runtimes.base.create passes them)
    OPTIONS: tuple[str, ...] = ()

    @classmethod
    @abstractmethod
    def availability(cls) -> Availability:
        """Can this runtime run on this machine? Never raises."""

    def prepare(self, model=None, allow_nonfinite: bool | None = None) -> None:
        """Loads (and, for compiling runtimes, compiles or takes from the cache) the model."""
        from .source import open_model
        if model is None and self.needs_model:
            raise UserError(f"{self.name} needs a model: an .onnx file or a folder written by `lstm-export compile`")
        source = None if model is None else open_model(model)
        if allow_nonfinite is not None:
            self.allow_nonfinite = allow_nonfinite
        with _failures_named(self.name, f"cannot load {source.path if source else 'the model'}"):
            self._prepare(source)
        self.source, self._prepared = source, True

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Checks `feeds` against the model's inputs, then runs once."""
        if not self._prepared:
            raise UserError(f"{self.name}: call prepare(model) before run()")
        if self.source is not None:
            self.source.check_feeds(feeds, self.allow_nonfinite)
        return self.run_checked(feeds)

    def run_checked(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs feeds that `run` has already accepted (same names, dtypes and values' ranges): for
        timing loops, where the check would be timed with the backend."""
        try:  # _failures_named's rule, without a context manager's cost on every served request
            return self._run(feeds)
        except UserError:
            raise
        except Exception as e:
            raise RuntimeFailure(f"{self.name} failed to run: {describe(e)}") from e

    def time_runs(self, feeds: dict[str, np.ndarray], **kwargs) -> list[float]:
        """Seconds per call on `feeds` that `run` has accepted (common.timing.time_runs's keyword
        arguments); a runtime whose calls happen elsewhere (tvm-deployed) times them there."""
        from lstm_export.common.timing import time_runs
        return time_runs(lambda: self.run_checked(feeds), **kwargs)

    @property
    def prepared(self) -> bool:
        return self._prepared

    @abstractmethod
    def _prepare(self, source) -> None:
        """Loads `source` (a source.ModelSource); raise UserError when it cannot run here."""

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs once on checked feeds."""

    def release(self) -> None:
        """Frees sessions and device memory; the runtime may be prepared again."""
        self.source, self._prepared = None, False
        self._release()

    def _release(self) -> None:  # noqa: B027 (optional hook: most backends hold nothing to free)
        """Backend-specific cleanup."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# name -> "module:Class"; modules are imported only when the runtime is asked for.
REGISTRY: dict[str, str] = {
    "torch": "lstm_export.runtimes.torch_runtime:TorchRuntime",
    "torch-nn": "lstm_export.runtimes.torch_runtime:TorchNNRuntime",
    "numpy-f64": "lstm_export.runtimes.numpy_reference:NumpyReferenceRuntime",
    "onnx-reference": "lstm_export.runtimes.onnx_reference:ReferenceRuntime",
    "ort-cpu": "lstm_export.runtimes.ort:OrtCpuRuntime",
    "ort-cuda": "lstm_export.runtimes.ort:OrtCudaRuntime",
    "tvm-llvm": "lstm_export.runtimes.tvm_runtime:TvmLlvmRuntime",
    "tvm-cuda": "lstm_export.runtimes.tvm_runtime:TvmCudaRuntime",
    "openvino": "lstm_export.runtimes.openvino_runtime:OpenVinoRuntime",
    # the reduced-precision peers as users meet them: OpenVINO's default (bf16 on bf16 CPUs), and
    # ONNX Runtime on the model dynamically quantized (int8 weights: DynamicQuantizeLSTM)
    "openvino-default": "lstm_export.runtimes.openvino_runtime:OpenVinoDefaultRuntime",
    "ort-cpu-int8": "lstm_export.runtimes.ort:OrtInt8Runtime",
    # ours at reduced precision (compile --precision), and ours as deployed (a fresh process)
    "tvm-bf16": "lstm_export.runtimes.tvm_runtime:TvmLowpRuntime",
    "tvm-int8": "lstm_export.runtimes.tvm_runtime:TvmInt8Runtime",
    "tvm-deployed": "lstm_export.runtimes.tvm_runtime:TvmDeployedRuntime",
}
ONNX_RUNTIMES = (
    "onnx-reference",
    "ort-cpu",
    "ort-cuda",
    "tvm-llvm",
    "tvm-cuda",
    "openvino",
)  # run any ONNX file (torch* need a checkpoint); what compare, bench MODEL and the demo run by default
# run any ONNX file too, at reduced precision: named explicitly (--runtimes), never a default, so an
# equality check does not turn into a bf16/int8 tolerance check unasked
REDUCED_RUNTIMES = ("openvino-default", "ort-cpu-int8", "tvm-bf16", "tvm-int8")


def runtime_class(name: str) -> type[Runtime]:
    if name not in REGISTRY:
        raise UserError(f"unknown runtime {name!r}; choose one of {', '.join(REGISTRY)} "
                        "(`lstm-export runtimes` lists what is available here)")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


@dataclass(frozen=True)
class RuntimeOptions:
    """What a command or the bench may ask of a runtime. Each runtime class names in its OPTIONS the
    fields its constructor takes; `create` passes those that are set (not None) and leaves the rest,
    so one options value serves every runtime of a comparison."""
    threads: int | None = None  # cores to run on (or to lay the compiled kernel out for)
    target: str | None = None  # tvm-llvm: the TVM target to compile an .onnx for
    cache: bool | None = None  # tvm-*: False compiles into a temporary folder, not the compile cache
    checkpoint: str | None = None  # torch, torch-nn, numpy-f64: our model, from a checkpoint
    model: object = None  # torch, torch-nn: our model, in memory
    device: str | None = None  # torch, torch-nn: "cpu" or "cuda"
    spin: bool | None = None  # ort-*: whether ONNX Runtime's threads spin between runs
    static_shapes: dict | None = None  # tvm-bf16, tvm-int8: compile an .onnx for these input shapes


def create(name: str, options: RuntimeOptions | None = None) -> Runtime:
    """The one factory of commands and the bench: a fresh, unprepared runtime by name, given the
    options its class takes; raises UserError if unknown or unavailable here."""
    cls = runtime_class(name)
    opts = options or RuntimeOptions()
    return get_runtime(name, **{f: getattr(opts, f) for f in cls.OPTIONS if getattr(opts, f) is not None})


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
