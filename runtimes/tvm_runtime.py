"""tvm-llvm and tvm-cuda: compile an ONNX model (or load a compiled DIR/model.so) and run it on the Relax VM."""
from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np

from lstm_export.errors import UserError

from .base import Availability, Runtime


class TvmLlvmRuntime(Runtime):
    """TVM on this CPU. `prepare` takes a .onnx (compiled now) or a folder made by `lstm-export compile`."""

    name = "tvm-llvm"
    target = "llvm"

    def __init__(self, threads: int | None = None, arch: str = "sm_90", target: str | None = None, plan=None):
        """threads: cores the kernels are laid out for; target: a full TVM target to compile an .onnx
        for (default: this machine); plan: a cpu_plan.KernelPlan to compile with (tests)."""
        self.threads, self.arch, self.plan = threads, arch, plan
        self.compile_target = target or self.target
        self.vm = self._main = None
        self._tmp = None
        self._staging = {}

    @classmethod
    def availability(cls) -> Availability:
        if importlib.util.find_spec("tvm") is None:
            return Availability(False, "apache-tvm is not installed (pip install 'apache-tvm>=0.27,<0.28')")
        return Availability(True)

    def _device(self):
        import tvm
        return tvm.cpu(0)

    def prepare(self, model) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine  # runtime only: deployed artifacts need no compiler
        path = Path(model)
        if path.is_dir():
            lib_path = path / "model.so"
            meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else None
            if meta is not None:  # a cross-compiled folder (model.tar) is named as such, not as missing
                _check_runs_here(meta, path)
            if not lib_path.is_file() or meta is None:
                raise UserError(f"{path} holds no model.so; make it with `lstm-export compile MODEL.onnx --out {path}`")
        else:
            from .tvm_lstm.compile import compile_onnx
            self._tmp = tempfile.TemporaryDirectory(prefix="lstm-export-tvm-")
            lib_path = compile_onnx(path, self._tmp.name, self.compile_target, self.arch, self.threads,
                                    progress=False, plan=self.plan)
            meta = json.loads((Path(self._tmp.name) / "meta.json").read_text())
            _check_runs_here(meta, self.compile_target)
        self.input_names = [i["name"] for i in meta["inputs"]]
        self.output_names = [o["name"] for o in meta["outputs"]]
        # outputs the call allocates are handed out without a copy (artifacts from before
        # owned_outputs was recorded: none); see compile.owned_outputs
        self._owned = meta.get("owned_outputs") or [False] * len(self.output_names)
        self.dev = self._device()
        self.vm = VirtualMachine(tvm.runtime.load_module(str(lib_path)), self.dev)
        self._main = self.vm["main"]  # looked up once, not per call

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [self._tensor(feeds[n], n) for n in self.input_names]
        out = self._main(*args)
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return {n: self._array(o, own) for n, o, own in zip(self.output_names, outs, self._owned)}

    def _tensor(self, a: np.ndarray, name: str):
        """A device tensor for `a`. On the CPU an aligned array is shared, not copied (12 us -> 0.4 us
        per call at one streaming step): Relax functions never write their inputs."""
        import tvm
        a = np.ascontiguousarray(a)
        if self.target == "llvm" and a.ctypes.data % 64 == 0 and a.flags.writeable:
            try:
                return tvm.runtime.from_dlpack(a)
            except (RuntimeError, BufferError, TypeError):
                pass  # e.g. a dtype DLPack cannot carry: copy it instead
        # An unaligned array (most large NumPy arrays) is copied into a staging tensor kept per shape,
        # not a new allocation per call (fresh pages cost more than the copy). Outputs are always
        # copied out, so no result can alias it.
        key = (name, a.shape, a.dtype.str)
        staged = self._staging.get(key)
        if staged is None:
            t = tvm.runtime.empty(a.shape, str(a.dtype), self.dev)
            # on the CPU, NumPy copies into the staging tensor through a view: copyfrom took 7.5 us
            # for the 1 KB input of one streaming step
            staged = self._staging[key] = (t, np.from_dlpack(t) if self.target == "llvm" else None)
        if staged[1] is not None:
            np.copyto(staged[1], a)
        else:
            staged[0].copyfrom(a)
        return staged[0]

    def _array(self, t, owned: bool) -> np.ndarray:
        """An output as NumPy. On the CPU a tensor the call allocated is shared, not copied (T50 B128:
        the copy of its 2.6 MB output took 0.19 ms of 3.1); the array keeps it alive. Any other output
        (an input or a constant of the VM, which a caller must not be able to write) is copied."""
        if self.target == "llvm":
            view = np.from_dlpack(t)
            return view if owned else np.array(view)
        return t.numpy()

    def release(self) -> None:
        self.vm = self._main = None
        self._staging = {}
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# CPU flags (/proc/cpuinfo) an llvm artifact's kernel ISA needs; running without them is SIGILL
ISA_FLAGS = {"avx512": ("avx512f",), "avx2": ("avx2", "fma")}


def _check_runs_here(meta: dict, where) -> None:
    """Refuses, in one line, an llvm artifact this machine cannot run: another architecture, or an
    ISA this CPU lacks (loading it would fail, running it would die of an illegal instruction)."""
    from .tvm_lstm.targets import machine_arch
    if meta.get("target_kind") != "llvm":
        return
    arch = meta.get("arch")
    if meta.get("library", "model.so") != "model.so" or (arch and arch != machine_arch()):
        raise UserError(f"{where} was cross-compiled for {arch or 'another machine'}; run it there "
                        "(or `lstm-export compile MODEL.onnx --target llvm` here)")
    isa = (meta.get("kernel_plan") or {}).get("isa")
    flags = _cpu_flags()
    missing = [f for f in ISA_FLAGS.get(isa, ()) if f not in flags]
    if missing and flags:
        raise UserError(f"{where} was built for {isa} and this CPU lacks {', '.join(missing)}; "
                        "compile it here with `--target llvm`")


def _cpu_flags() -> set[str]:  # a seam for tests that fake another CPU
    from .tvm_lstm.targets import cpu_flags
    return cpu_flags()


class TvmCudaRuntime(TvmLlvmRuntime):
    name = "tvm-cuda"
    target = "cuda"

    @classmethod
    def availability(cls) -> Availability:
        base = super().availability()
        if not base:
            return base
        from .ort import _cuda_device_present
        if not _cuda_device_present():
            return Availability(False, "no CUDA device")
        return Availability(True)

    def _device(self):
        import tvm
        return tvm.cuda(0)
