"""ONNX -> Relax (with our LSTM converter) -> a Relax VM library for llvm or cuda.

The artifact is DIR/model.so (`export_library`), whose `main` takes the graph inputs in graph order
and returns the graph outputs in graph order, and DIR/meta.json describing them.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from lstm_export.errors import UserError

from ..model_io import input_specs, load_onnx, output_specs


def host_target(threads: int | None = None):
    """llvm for this CPU: its own -mcpu (AVX-512 here) and its core count."""
    import tvm
    from tvm.target import codegen
    cfg = {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "mtriple": codegen.llvm_get_system_triple(),
           "num-cores": threads or os.cpu_count() or 1}
    return tvm.target.Target(cfg)


def cuda_target(arch: str = "sm_90"):
    import tvm
    if not arch.startswith("sm_"):
        raise UserError(f"--arch {arch!r} must look like sm_90")
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})


def import_onnx(model, cuda: bool = False):
    """Relax IRModule from an ONNX ModelProto, with our LSTM converter registered."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from .converter import lstm_registered
    try:
        with lstm_registered(cuda):
            return from_onnx(model, keep_params_in_input=False)
    except tvm.error.OpNotImplemented as e:
        ops = str(e).split(":", 1)[-1].strip().splitlines()[0]
        raise UserError(f"TVM cannot import this model: no converter for operator(s) {ops}") from None


def compile_module(mod, target):
    import tvm
    if target.kind.name == "cuda":
        if shutil.which("nvcc") is None:
            raise UserError("compiling for cuda needs nvcc on PATH (install the CUDA toolkit)")
        from .cuda import schedule_for_cuda
        mod = schedule_for_cuda(mod, target)
    else:
        from tvm.relax.backend.cpu_generic import legalize_passes

        from .cpu_schedule import schedule_generic_cpu_kernels
        with target:
            mod = tvm.transform.Sequential(legalize_passes(target))(mod)
        mod = schedule_generic_cpu_kernels(mod)
    return tvm.compile(mod, target=target)


def compile_onnx(model_path: str | Path, out_dir: str | Path, target: str = "llvm", arch: str = "sm_90",
                 threads: int | None = None) -> Path:
    """Compiles an ONNX file; writes OUT/model.so and OUT/meta.json; returns OUT/model.so.

    Args:
        model_path: any ONNX model whose ops TVM (plus our LSTM converter) supports.
        out_dir: the folder to write.
        target: "llvm" (this CPU's features and cores) or "cuda".
        arch: CUDA architecture for target="cuda".
        threads: cores the llvm target assumes (default: all).
    """
    import tvm
    model = load_onnx(model_path)
    if target not in ("llvm", "cuda"):
        raise UserError(f"--target {target!r} must be llvm or cuda")
    tgt = host_target(threads) if target == "llvm" else cuda_target(arch)
    t0 = time.perf_counter()
    mod = import_onnx(model, cuda=target == "cuda")
    ex = compile_module(mod, tgt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lib = out / "model.so"
    tmp = out / ".model.so.tmp.so"
    ex.export_library(str(tmp))
    tmp.replace(lib)
    meta = {"inputs": [_spec(s) for s in input_specs(model)], "outputs": [_spec(s) for s in output_specs(model)],
            "target": str(tgt.export()) if hasattr(tgt, "export") else str(tgt), "target_kind": target,
            "tvm_version": tvm.__version__, "source": str(model_path), "compile_s": round(time.perf_counter() - t0, 3)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return lib


def _spec(s) -> dict:
    return {"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape)}
