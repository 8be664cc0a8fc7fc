"""The build stage: a Relax IRModule -> an executable (TVM's pipeline, our schedules, the tuning
database), and the artifact's library written from it (model.so, or model.tar of objects)."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lstm_export.common.errors import UserError, first_line

from ..target.targets import is_cross
from .importer import failure_for


@dataclass(frozen=True)
class Built:
    """An executable as built, never run by a VM (one that has run exports with its VM's state, and
    every load of that model.so printed TVM's "Scope Loaded" warnings), the number of kernels
    scheduled from the tuning database, and owned_outputs of its main."""

    executable: object
    kernels_from_db: int
    owned_outputs: list


def legalize_cpu(mod, target):
    """Relax ops lowered to fused PrimFuncs (TVM's CPU pipeline up to scheduling): what tuning sees."""
    import tvm
    from tvm.relax.backend.cpu_generic import legalize_passes
    with target:
        return tvm.transform.Sequential(legalize_passes(target))(mod)


def build(model, mod, target, database=None, lanes: int = 16) -> Built:
    """compile_module, with TVM's failures as one line (a SymbolicShapeError on a model with symbolic
    input dims); TVM's C++ log lines go to the debug log."""
    from ..target.native_log import native_stderr_to_log
    with native_stderr_to_log("TVM build"):  # its C++ warnings (e.g. topi's take) are no console noise
        try:
            return Built(*compile_module(mod, target, database, lanes))
        except UserError:
            raise
        except Exception as e:
            failure = failure_for(model, f"TVM cannot build this model: {first_line(e, 200)}")
    raise failure


def compile_module(mod, target, database=None, lanes: int = 16):
    """(executable, number of kernels scheduled from `database`, owned outputs). On llvm, kernels the
    database knows take its fastest record; the rest get generic_schedule's default; our LSTM kernels
    come scheduled. Owned outputs: see owned_outputs."""
    import tvm
    from tvm import relax
    from_db = 0
    if target.kind.name == "cuda":
        if shutil.which("nvcc") is None:
            raise UserError("compiling for cuda needs nvcc on PATH (install the CUDA toolkit)")
        from ..kernels.cuda import schedule_for_cuda
        mod = schedule_for_cuda(mod, target)
        try:  # what tvm.compile picks for a GPU target
            pipeline = relax.get_default_pipeline(target)
        except (ValueError, AttributeError):
            pipeline = relax.get_pipeline("default")
    else:
        from ..kernels.generic_schedule import schedule_generic_cpu_kernels
        mod = legalize_cpu(mod, target)
        if database is not None:
            from .tuning import apply_database
            mod, from_db = apply_database(mod, target, database)
        mod = schedule_generic_cpu_kernels(mod, lanes)
        pipeline = relax.get_pipeline("default")
    with target:  # the Relax pipeline run here, not in tvm.compile, to read the lowered main
        mod = pipeline(mod)
    return tvm.compile(mod, target=target, relax_pipeline=None), from_db, owned_outputs(mod["main"])


def owned_outputs(main) -> list[bool]:
    """For each output of a lowered Relax `main`, whether it is a tensor the call allocated (possibly
    reshaped) and no other output shares: memory nothing else holds, which a caller may keep without
    a copy. An output that is (or may be) an input, a constant, another output's memory or anything
    else is False, and must be copied."""
    import tvm
    from tvm import relax
    bound = {}
    for block in main.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                bound[b.var] = b.value

    def allocation(e):
        """The variable bound to the vm.alloc_tensor that e is (a view of), else None."""
        for _ in range(1000):  # follows a chain of bindings; never loops (SSA)
            if isinstance(e, relax.Var) and e in bound:
                v = bound[e]
                if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op):
                    return e if v.op.name == "relax.vm.alloc_tensor" else None
                e = v
            elif isinstance(e, relax.Call) and isinstance(e.op, relax.ExternFunc) and \
                    e.op.global_symbol == "vm.builtin.reshape":
                e = e.args[0]  # a view of its first argument
            else:
                return None
        return None

    ret = main.body.body
    while isinstance(ret, relax.Var) and isinstance(bound.get(ret), relax.Tuple):
        ret = bound[ret]
    roots = [allocation(f) for f in (ret.fields if isinstance(ret, relax.Tuple) else [ret])]
    return [r is not None and sum(r.same_as(o) for o in roots if o is not None) == 1 for r in roots]


def export_library(ex, tgt, plan, out: Path, lowp: bool = False) -> Path:
    """Writes the executable: model.so linked with the thread-pool constructor (thread_pool.py), and
    the reduced-precision kernel (lowp/engine.py) with `lowp`, for an llvm target with a linker for
    its architecture here; model.tar (objects and the C sources) for a cross-compile without one;
    model.so for CUDA."""
    from tvm.target import codegen

    from ..target.thread_pool import compiler_for, source, thread_pool_object
    if plan is None:  # CUDA: the host side only launches kernels
        lib = out / "model.so"
        tmp = out / ".model.so.tmp.so"
        ex.export_library(str(tmp))
        tmp.replace(lib)
        return lib
    triple = str(tgt.attrs.get("mtriple") or codegen.llvm_get_system_triple())
    cc = compiler_for(triple, codegen.llvm_get_system_triple())
    with tempfile.TemporaryDirectory(prefix="lstm-export-link-") as work:
        from ..kernels.lowp.engine import SOURCE, object_file
        if cc is None:  # no linker for that architecture here: the objects, to link where it runs
            src = Path(work) / "lstm_export_threads.c"
            src.write_text(source(plan.threads))
            lib, tmp = out / "model.tar", out / ".model.tar.tmp.tar"
            ex.export_library(str(tmp), addons=[str(src)] + ([str(SOURCE)] if lowp else []))
        else:
            objs = [thread_pool_object(work, plan.threads, cc)] + ([object_file(work, cc)] if lowp else [])
            lib, tmp = out / "model.so", out / ".model.so.tmp.so"
            kwargs = {} if not is_cross(tgt) else {"cc": cc}
            ex.export_library(str(tmp), addons=[str(o) for o in objs], **kwargs)
        tmp.replace(lib)
    return lib
