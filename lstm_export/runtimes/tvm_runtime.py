"""tvm-llvm and tvm-cuda: load a compiled folder (or compile an .onnx through the compile cache) and
run it on the Relax VM."""
from __future__ import annotations

import importlib.util
import tempfile

import numpy as np

from lstm_export.common.errors import UserError, describe

from .base import Availability, Runtime


class TvmLlvmRuntime(Runtime):
    """TVM on this CPU. `prepare` takes a folder made by `lstm-export compile` (loaded as it is) or
    an .onnx (compiled once per model and target: tvm_lstm/pipeline/cache.py)."""
    name = "tvm-llvm"
    OPTIONS = ("threads", "target", "cache")
    target = "llvm"

    def __init__(self, threads: int | None = None, arch: str = "sm_90", target: str | None = None, plan=None,
                 cache: bool = True):
        """threads: cores the kernels are laid out for; target: a full TVM target to compile an .onnx
        for (default: this machine); plan: a cpu_plan.KernelPlan to compile with (tests);
        cache: False compiles an .onnx into a temporary folder instead of the compile cache."""
        self.threads, self.arch, self.plan, self.cache = threads, arch, plan, cache
        self.compile_target = target or self.target
        self.vm = self._main = None
        self._tmps = []
        self._staging = {}
        self.compiled = None  # the source.CompiledModel loaded
        self.cache_hit = None  # for an .onnx: whether the compile cache had it
        # an .onnx TVM cannot import with its symbolic dims: compiled per set of feed shapes at run
        self._deferred = None  # (source, the symbolic import's error)
        self._loaded = {}  # feed shapes (and switch values) -> (compiled, vm, main, owned, values)
        self._values = {}  # inputs the loaded build was compiled for one value of

    @classmethod
    def availability(cls) -> Availability:
        if importlib.util.find_spec("tvm") is None:
            return Availability(False, "apache-tvm is not installed (pip install 'apache-tvm>=0.27,<0.28')")
        return Availability(True)

    def _device(self):
        import tvm
        return tvm.cpu(0)

    def _prepare(self, source) -> None:
        if source.compiled is not None:
            compiled, where = source.compiled, source.path
            kind = compiled.meta.target_kind
            if kind != self.target:
                raise UserError(f"{source.path} was compiled for {kind}; run it with "
                                f"--runtime tvm-{kind}, or compile it for {self.target}")
        else:
            try:
                self._load(self._compile(source), self.compile_target)
            except Exception as e:  # noqa: BLE001 -- any failure of the symbolic build, compiling or loading
                if not _open_inputs(source):
                    raise
                # the feeds fix every dim (and the switches' values): run compiles for them, as
                # `compile --input-shape --input-value` would (a failure of both names the node then)
                self._deferred = (source, e)
            return
        self._load(compiled, where)

    def _load(self, compiled, where) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine  # runtime only: deployed artifacts need no compiler
        meta = compiled.meta
        _check_runs_here(meta, where)
        if compiled.library.suffix != ".so":
            raise UserError(f"{where} holds no model.so; make it with `lstm-export compile MODEL.onnx --out DIR`")
        self.compiled = compiled
        self.input_names = [i["name"] for i in meta.inputs]
        self.output_names = [o["name"] for o in meta.outputs]
        # outputs the call allocates are handed out without a copy (artifacts from before
        # owned_outputs was recorded: none); see compile.owned_outputs
        self._owned = meta.owned_outputs or [False] * len(self.output_names)
        self._values = meta.input_values
        self.precision = meta.precision  # compile --precision
        self.dev = self._device()
        self.vm = VirtualMachine(tvm.runtime.load_module(str(compiled.library)), self.dev)
        self._main = self.vm["main"]  # looked up once, not per call

    def _compile(self, source, input_shapes=None, input_values=None):
        """An .onnx: from the compile cache, or compiled into a temporary folder with cache=False."""
        opts = self._options(input_shapes, input_values)
        if self.cache:
            from .tvm_lstm import cached_compile
            compiled, self.cache_hit = cached_compile(source, opts)
            return compiled
        from .tvm_lstm import compile_onnx
        tmp = tempfile.TemporaryDirectory(prefix="lstm-export-tvm-")
        self._tmps.append(tmp)
        return compile_onnx(source, tmp.name, opts)

    def _options(self, input_shapes=None, input_values=None):
        """The CompileOptions an .onnx is compiled with."""
        from .tvm_lstm import CompileOptions
        return CompileOptions(target=self.compile_target, arch=self.arch, threads=self.threads, plan=self.plan,
                              progress=False, input_shapes=input_shapes or {}, input_values=input_values or {})

    def _specialise(self, feeds) -> None:
        """Loads the build for these feeds' shapes (compiled, or from the cache, on first sight)."""
        source, why = self._deferred
        switches = _switch_inputs(source)
        shapes = {n: tuple(feeds[n].shape) for n in source.input_names if n not in switches}
        values = {n: feeds[n].item() for n in switches}
        key = (tuple(sorted(shapes.items())), tuple(sorted(values.items())))
        if key not in self._loaded:
            try:
                self._load(self._compile(source, shapes, values), self.compile_target)
            except Exception as e:  # noqa: BLE001 -- the symbolic build failed too: one line, the node's
                fixed = [f"{n}={_x(s)}" for n, s in shapes.items()] + [f"{n}={v}" for n, v in values.items()]
                text = str(e) if isinstance(e, UserError) else f"tvm-llvm cannot load its build: {describe(e)}"
                raise UserError(f"{text} (with the inputs fixed from the feeds: {', '.join(fixed)})") from None
            self._loaded[key] = (self.compiled, self.vm, self._main, self._owned, self._values)
        self.compiled, self.vm, self._main, self._owned, self._values = self._loaded[key]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._deferred is not None:
            self._specialise(feeds)
        for name, value in self._values.items():  # compiled with --input-value: that value only
            if name in feeds and feeds[name].item() != value:
                raise UserError(f"input {name} is {feeds[name].item()}, but this artifact was compiled for "
                                f"{name}={value}; compile it again with --input-value {name}={feeds[name].item()}")
        args = [self._tensor(feeds[n], n) for n in self.input_names]
        out = self._main(*args)
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return {n: self._array(o, own) for n, o, own in zip(self.output_names, outs, self._owned)}

    def _tensor(self, a: np.ndarray, name: str):
        """A device tensor for `a`. On the CPU an aligned array is shared, not copied (12 us -> 0.4 us
        per call at one streaming step): Relax functions never write their inputs."""
        import tvm
        a = a if a.flags.c_contiguous else np.ascontiguousarray(a)  # (ascontiguousarray makes a 0-d array 1-d)
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

    def _release(self) -> None:
        self.vm = self._main = self.compiled = None
        self._staging, self._loaded, self._deferred = {}, {}, None
        for tmp in self._tmps:
            tmp.cleanup()
        self._tmps = []


def _open_inputs(source) -> bool:
    """Whether the feeds would tell a build more than the model declares: an input dim left open,
    or a scalar switch whose value picks an If branch."""
    from .model_io import fixed_dim
    return any(not fixed_dim(d) for s in source.inputs for d in s.shape) or bool(_switch_inputs(source))


def _switch_inputs(source) -> list[str]:
    """Scalar integer or bool inputs of a model with If nodes: a sample-rate switch and the like,
    whose value picks a branch; a build for the feeds fixes their values too (one branch imports)."""
    proto = source.proto
    if proto is None or not any(n.op_type == "If" for n in proto.graph.node):
        return []
    return [s.name for s in source.inputs
            if not s.shape and (np.issubdtype(s.dtype, np.integer) or s.dtype == np.bool_)]


def _x(shape) -> str:
    return "x".join(map(str, shape))


# CPU flags (/proc/cpuinfo) an llvm artifact's kernel ISA needs; running without them is SIGILL
ISA_FLAGS = {"avx512": ("avx512f",), "avx2": ("avx2", "fma")}


def _check_runs_here(meta, where) -> None:
    """Refuses, in one line, an llvm artifact this machine cannot run: another architecture, or an
    ISA this CPU lacks (loading it would fail, running it would die of an illegal instruction)."""
    from .tvm_lstm import machine_arch
    if meta.target_kind != "llvm":
        return
    arch = meta.arch
    if meta.library != "model.so" or (arch and arch != machine_arch()):
        raise UserError(f"{where} was cross-compiled for {arch or 'another machine'}; run it there "
                        "(or `lstm-export compile MODEL.onnx --target llvm` here)")
    isa = (meta.kernel_plan or {}).get("isa")
    flags = _cpu_flags()
    missing = [f for f in ISA_FLAGS.get(isa, ()) if f not in flags]
    if missing and flags:
        raise UserError(f"{where} was built for {isa} and this CPU lacks {', '.join(missing)}; "
                        "compile it here with `--target llvm`")


def _cpu_flags() -> set[str]:  # a seam for tests that fake another CPU
    from .tvm_lstm import cpu_flags
    return cpu_flags()


class TvmCudaRuntime(TvmLlvmRuntime):
    name = "tvm-cuda"
    target = "cuda"
    OPTIONS = ("threads", "cache")  # its target is cuda: a CPU target option is not for it

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


class TvmLowpRuntime(TvmLlvmRuntime):
    """tvm-llvm with its LSTM layers in reduced precision (`compile --precision bf16`; tvm-int8:
    int8): an .onnx is compiled into a temporary folder (for `static_shapes` when given: the bench
    gives its feeds' shapes) and loaded as users load it; a compiled folder runs as it is."""
    name = "tvm-bf16"
    OPTIONS = ("threads", "target", "static_shapes")
    lowp = "bf16"
    CPU_FLAGS = ("avx512_bf16",)  # what the kernel needs of this CPU (lowp/engine.require checks the target)

    def __init__(self, threads: int | None = None, target: str | None = None, static_shapes: dict | None = None):
        super().__init__(threads=threads, target=target, cache=False)
        self.static_shapes = static_shapes
        self.precision = self.lowp

    @classmethod
    def availability(cls) -> Availability:
        base = super().availability()
        if not base:
            return base
        missing = [f for f in cls.CPU_FLAGS if f not in _cpu_flags()]
        return Availability(False, f"no {', '.join(missing)} on this CPU") if missing else Availability(True)

    def _options(self, input_shapes=None, input_values=None):
        return super()._options(self.static_shapes or input_shapes, input_values).replace(precision=self.lowp)


class TvmInt8Runtime(TvmLowpRuntime):
    name = "tvm-int8"
    lowp = "int8"
    CPU_FLAGS = ("avx512_vnni",)


class TvmDeployedRuntime(TvmLlvmRuntime):
    """tvm-llvm as a user deploys it: the compiled folder (an .onnx through the compile cache)
    served by a fresh worker process that imports nothing of ours (deployed.py); `time_runs` times
    the calls inside that process, where a deployment makes them."""
    name = "tvm-deployed"
    OPTIONS = ("threads", "target")
    worker = None

    def _prepare(self, source) -> None:
        from .deployed import DeployedArtifact
        compiled = source.compiled if source.compiled is not None else self._compile(source)
        _check_runs_here(compiled.meta, source.path)
        self.compiled, self.precision = compiled, compiled.meta.precision
        self.worker = DeployedArtifact(compiled.folder)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.worker.run(feeds)

    def time_runs(self, feeds: dict[str, np.ndarray], **kwargs) -> list[float]:
        """Seconds per call of checked feeds, timed in the worker (common.timing.time_runs's arguments)."""
        return self.worker.time_runs(feeds, **kwargs)

    def _release(self) -> None:
        if self.worker is not None:
            self.worker.release()
            self.worker = None
        super()._release()
