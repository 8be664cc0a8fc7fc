"""ONNX -> Relax (with our LSTM converter) -> a Relax VM library for llvm or cuda.

The artifact is DIR/model.so (`export_library`), whose `main` takes the graph inputs in graph order
and returns the graph outputs in graph order, and DIR/meta.json describing them.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from lstm_export.common.errors import UserError, first_line

from ...source import SOURCE_ONNX, CompiledModel, ModelSource, open_model
from ..target.targets import arch_of, cuda_target, host_target, is_cross, parse_target  # noqa: F401 (host_target, cuda_target: API)


def import_onnx(model, cuda: bool = False, plan=None, bf16=None):
    """Relax IRModule from an ONNX ModelProto, with our LSTM converter registered (its CPU kernels
    laid out by `plan`, a cpu_plan.KernelPlan for the llvm target; None on CUDA; LSTM layers in bf16
    with `bf16`, a bf16_layer.Bf16Options). TVM's own C++ log
    lines (warnings of a failed import) go to this module's debug log, not the console."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from ..frontend.registry import ConvertFailure, lstm_registered
    from ..target.native_log import native_stderr_to_log
    printed = io.StringIO()  # the frontend prints "Error converting operator X, ...": no console text
    failure = None
    with native_stderr_to_log("TVM import"):
        try:
            with lstm_registered(cuda, plan, bf16), contextlib.redirect_stdout(printed):
                return from_onnx(model, keep_params_in_input=False)
        except tvm.error.OpNotImplemented as e:
            ops = str(e).split(":", 1)[-1].strip().splitlines()[0]
            failure = UserError(f"TVM cannot import this model: no converter for operator(s) {ops}")
        except UserError as e:
            failure = type(e)(str(e))
        except ConvertFailure as e:
            where = f"{e.op} node {e.node!r}" if e.node else f"a {e.op} node"
            failure = _failure(model, f"TVM cannot import {where}: {first_line(e.cause, 200).rstrip('.')}")
        except Exception as e:  # one line: the op, the node, TVM's reason
            failure = _import_failure(model, first_line(e, 200))
        # the failed import's frames (and the BlockBuilder they hold, which warns when destroyed)
        # are freed here, while TVM's log still goes to the debug log
        import gc
        gc.collect()
    raise failure


def _import_failure(model, why: str) -> UserError:
    """One line naming the node a failure outside the converters (those are ConvertFailures) was on,
    and its reason: a SymbolicShapeError when the model has symbolic input dims (static shapes may
    cure it), else a UserError."""
    from ..frontend.simplify import all_nodes
    nodes_all = list(all_nodes(model.graph))  # If/Loop/Scan bodies too: exporters wrap whole models in If
    first = why.split(maxsplit=1)[0] if why else ""  # TVM's message may start with the op
    op = first if any(n.op_type == first for n in nodes_all) else None
    named = re.search(r"\bNode (\S+) ", why)  # TVM's "Node node_2 cannot handle ShapeExpr inputs"
    hit = [n for n in nodes_all if named and n.name == named.group(1)]
    if op is None and len(hit) == 1:
        op = hit[0].op_type
    nodes = [n.name or f"#{i}" for i, n in enumerate(nodes_all) if n.op_type == op and (not hit or n in hit)]
    where = (f"{op} node {nodes[0]!r}" if len(nodes) == 1 else
             f"one of the {op} nodes ({', '.join(map(repr, nodes[:4]))})" if nodes else "this model")
    return _failure(model, f"TVM cannot import {where}: {why.rstrip('.')}")


def _failure(model, text: str) -> UserError:
    from lstm_export.common.errors import SymbolicShapeError

    from ...model_io import fixed_dim, input_specs
    symbolic = any(not fixed_dim(d) for s in input_specs(model) for d in s.shape)
    return SymbolicShapeError(text) if symbolic else UserError(
        f"{text}; run it with --runtime ort-cpu meanwhile, and report the model with this line")


def legalize_cpu(mod, target):
    """Relax ops lowered to fused PrimFuncs (TVM's CPU pipeline up to scheduling): what tuning sees."""
    import tvm
    from tvm.relax.backend.cpu_generic import legalize_passes
    with target:
        return tvm.transform.Sequential(legalize_passes(target))(mod)


def build(model, mod, target, database=None, lanes: int = 16):
    """compile_module, with TVM's failures as one line (a SymbolicShapeError on a model with symbolic
    input dims); TVM's C++ log lines go to the debug log."""
    from ..target.native_log import native_stderr_to_log
    with native_stderr_to_log("TVM build"):  # its C++ warnings (e.g. topi's take) are no console noise
        try:
            return compile_module(mod, target, database, lanes)
        except UserError:
            raise
        except Exception as e:
            failure = _failure(model, f"TVM cannot build this model: {first_line(e, 200)}")
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


def compile_onnx(model_path: str | Path | ModelSource, out_dir: str | Path, target: str = "llvm",
                 arch: str = "sm_90", threads: int | None = None, tuning_db: str | Path | None = None,
                 tune_trials: int = 0, progress: bool = True, plan=None, plan_budget_s: float | None = None,
                 dims: dict[str, int] | None = None,
                 input_shapes: dict[str, tuple[int, ...]] | None = None,
                 input_values: dict | None = None, precision: str = "fp32") -> CompiledModel:
    """Compiles an ONNX model; writes OUT/model.so (or, cross-compiled with no linker for that
    architecture here, OUT/model.tar of objects), OUT/meta.json and OUT/model.onnx (the source, so
    every runtime can run the folder); returns the CompiledModel.

    Args:
        model_path: any ONNX model whose ops TVM (plus our LSTM converter) supports, as a path or
            an opened source.ModelSource.
        out_dir: the folder to write.
        target: "llvm" (this CPU's features and cores), "cuda", or a full TVM target as JSON or in
            the CLI string form (`llvm -mcpu=haswell -num-cores=4`,
            `{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1"}`); see targets.py.
        arch: CUDA architecture for target="cuda".
        threads: cores the llvm target assumes (default: the target's num-cores, else this machine's).
        tuning_db: MetaSchedule database folder for llvm (default: the committed one for this CPU and
            core count, when there is one; see tuning.py). "none" compiles without one.
        tune_trials: > 0 first tunes this model's kernels into tuning_db with that many trials.
        plan: the CPU kernel's cpu_plan.KernelPlan; tests pass their own. Default: for a target this
            machine runs, the fastest of a few plans timed on the model's shapes (plan_select.py),
            else plan_for(target), the plan derived from the target.
        plan_budget_s: seconds that measuring may take (default: $LSTM_EXPORT_PLAN_BUDGET_S, else
            10); 0 takes the derived plan. meta.json records the choice and its timings.
        dims: sizes for named symbolic dims, fixed before the graph is simplified (simplify.py);
            the others stay symbolic.
        input_shapes: whole static shapes of named inputs (compile --input-shape): written into
            the graph with the symbolic dims they bind, so shape arithmetic on them folds away;
            the artifact then takes those shapes only (meta.json records them).
        input_values: scalar inputs fixed to one value (compile --input-value sr=16000): constants
            in the graph, so an If on them folds to one branch; the artifact's main no longer takes
            them, and a run with another value is refused (meta.json records them).
        precision: "fp32", or "bf16": LSTM layers with bf16 weights and fp32 accumulation and state
            (bf16.py; llvm targets with AVX512-BF16, AMX where the CPU has it); each layer's engine
            is timed here within plan_budget_s, and meta.json's bf16_layers says what was chosen;
            "int8": int8 weights (AVX-512 VNNI) for the layers where they pay, bf16 for the others.
    """
    import tvm
    from tvm.target import codegen

    from ...model_io import bind_shapes
    from ..frontend.simplify import needs_simplifying, simplify
    from ..frontend.slice_bounds import clamp_slice_bounds
    source = open_model(model_path)
    model = source.onnx()
    static, dims = bind_shapes(source.inputs, dict(input_shapes or {}), dims) if input_shapes else ({}, dims)
    values = dict(input_values or {})
    if dims or static or values or needs_simplifying(model):  # shape arithmetic TVM cannot take: folded first
        model = simplify(model, dims, static, values, source.inputs)
    model = clamp_slice_bounds(model)  # a flip's end=-INT64_MAX overflows TVM's int64 on a symbolic axis
    tgt = parse_target(target, threads, arch)
    kind = tgt.kind.name
    choice = bf16 = None
    if precision not in ("fp32", "bf16", "int8"):
        raise UserError(f"--precision {precision}: choose fp32, bf16 or int8")
    if precision != "fp32":
        plan, choice, bf16 = _bf16_setup(tgt, plan, plan_budget_s, precision)
    if kind != "llvm":
        plan = None
    elif plan is None:
        from ..kernels.cpu_plan import is_host, plan_for
        from .plan_select import PlanChoice, budget_from
        plan, budget = plan_for(tgt), budget_from(plan_budget_s)
        if budget < 0:
            raise UserError(f"--plan-budget-s {budget:g}: give 0 (the derived plan) or more seconds")
        why = ("--plan-budget-s 0" if budget == 0 else None) or \
            (None if is_host(tgt) else "the target is not this machine: nothing to measure on")
        choice = PlanChoice("derived", "derived", why=why) if why else \
            PlanChoice("measured", "derived", budget_s=budget)
    t0 = time.perf_counter()
    mod = import_onnx(model, cuda=kind == "cuda", plan=plan, bf16=bf16)
    if bf16 is not None and not bf16.layers:
        raise UserError(f"--precision {precision}: this model has no LSTM layer with constant weights to compute "
                        f"in {precision}; compile it at fp32 (the default)")
    db, db_dir, tuned = None, None, None
    if kind == "llvm" and str(tuning_db) != "none":
        from .tuning import default_db_dir, open_database, tune
        db_dir = Path(tuning_db) if tuning_db else default_db_dir(tgt)
        if tune_trials > 0:
            if is_cross(tgt):
                raise UserError("--tune measures on this machine; it cannot tune for another architecture")
            tuned = tune(legalize_cpu(mod, tgt), tgt, db_dir, tune_trials, progress=progress)
            t0 = time.perf_counter()  # compile time is what a deployment pays, without the tuning
        db = open_database(db_dir)
        if db is None and tuning_db and not tune_trials:  # asked for one that is not there
            raise UserError(f"--tuning-db {db_dir} holds no MetaSchedule database; make one with "
                            f"`lstm-export compile MODEL.onnx --tune --trials N --tuning-db {db_dir}`")
    elif tune_trials > 0:
        raise UserError("--tune works with llvm targets only (CUDA kernels are scheduled by dlight)")
    if choice is not None and choice.source == "measured":
        plan, _, choice = _measured_plan(model, source, tgt, plan, mod, db, static, values, dims,
                                         choice.budget_s, progress)
        # The winner is built again, not exported as timed: an executable a VM has run exports with
        # its VM's state, and every load of that model.so printed TVM's "Scope Loaded" warnings.
        if choice.chosen != "derived":
            mod = import_onnx(model, plan=plan)
    ex, from_db, owned = build(model, mod, tgt, db, plan.lanes if plan else 16)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from ..target.native_log import native_stderr_to_log
    with native_stderr_to_log("TVM export"):
        lib = _export(ex, tgt, plan, out, bf16 is not None)
    meta = {
        "inputs": [_spec(s, static.get(s.name)) for s in source.inputs if s.name not in values],
        "outputs": [_spec(s) for s in source.outputs],
        "target": str(tgt.export()) if hasattr(tgt, "export") else str(tgt),
        "target_kind": kind,
        "tvm_version": tvm.__version__,
        "source": str(source.path),
        "onnx_sha256": source.digest,
        "index_bounds": source.index_bounds,
        "length_inputs": source.length_inputs,
        "dims": dict(dims or {}),
        "input_shapes": {k: list(v) for k, v in static.items()},
        "input_values": values,
        "compile_s": round(time.perf_counter() - t0, 3),
        "tuning_db": str(db_dir) if db is not None else None,
        "kernels_from_db": from_db,
        "owned_outputs": owned,
        "library": lib.name,
        "precision": precision,
    }
    if bf16 is not None:
        meta["bf16_layers"] = bf16.layers
    if plan is not None:
        meta["num_cores"] = plan.threads
        meta["cpu"] = plan.info.describe() if plan.info else None
        meta["kernel_plan"] = {k: v for k, v in asdict(plan).items() if k != "info"}
        if choice is not None:
            meta["plan_selection"] = asdict(choice)
        meta["cross_compiled"] = is_cross(tgt) or str(tgt.attrs.get("mcpu", "")) != codegen.llvm_get_system_cpu()
        meta["arch"] = arch_of(tgt.attrs.get("mtriple") or codegen.llvm_get_system_triple())
    if tuned is not None:
        meta["tuning"] = {"trials": tuned.trials, "seconds": tuned.seconds, "tasks": tuned.tasks,
                          "before_ms": tuned.before_ms, "best_ms": tuned.best_ms, "skipped": tuned.skipped}
    if source.onnx_path.resolve() != (out / SOURCE_ONNX).resolve():
        shutil.copyfile(source.onnx_path, out / f".{SOURCE_ONNX}.tmp")
        (out / f".{SOURCE_ONNX}.tmp").replace(out / SOURCE_ONNX)
    (out / ".meta.json.tmp").write_text(json.dumps(meta, indent=1) + "\n")
    (out / ".meta.json.tmp").replace(out / "meta.json")  # last: a folder with meta.json is complete
    return CompiledModel(out, lib, meta)


def _measured_plan(model, source, tgt, base, mod, db, static, values, dims, budget_s, progress):
    """plan_select.select on random inputs at the artifact's shapes (main's arguments, in order)."""
    from .plan_select import select, timing_feeds
    feeds = timing_feeds(source, static, dims)
    feeds = {s.name: feeds[s.name] for s in source.inputs if s.name not in values}
    def say(text):  # a few seconds in all: one line per candidate, on a terminal or not
        print(f"compile: building {text} to time it", file=sys.stderr, flush=True)
    return select(model, tgt, base, lambda m, plan: import_onnx(m, plan=plan),
                  lambda plan, m: build(model, m, tgt, db, plan.lanes), feeds, budget_s,
                  derived_mod=mod, progress=say if progress else None)


def _bf16_setup(tgt, plan, plan_budget_s, precision="bf16"):
    """(plan, choice, Bf16Options) for compile --precision bf16 or int8: the fp32 plan derived (it
    lays out any other kernels), and each LSTM layer's engine timed on this machine instead."""
    from tvm.target import codegen

    from ..kernels.cpu_plan import is_host, plan_for
    from ..kernels.lowp.bf16 import has_amx_int8, require
    from ..kernels.lowp.bf16_layer import Bf16Options
    from ..target.thread_pool import compiler_for
    from .plan_select import PlanChoice, budget_from
    if tgt.kind.name != "llvm":
        raise UserError(f"--precision {precision} is a CPU path (llvm targets); compile for cuda at fp32")
    dot, amx = require(tgt, precision)
    plan = plan or plan_for(tgt)
    budget, host = budget_from(plan_budget_s), is_host(tgt)
    cc = compiler_for(codegen.llvm_get_system_triple(), codegen.llvm_get_system_triple()) if host else None
    measure = min(budget, 3.0) if host and cc else 0.0  # per distinct layer
    why = f"--precision {precision}: each LSTM layer's engine is chosen instead (bf16_layers)"
    opts = Bf16Options(amx=amx, threads=plan.threads, l2_bytes=plan.info.l2 if plan.info else 1 << 20,
                       measure_s=measure, cc=cc, dot=dot, int8=precision == "int8",
                       amx8=precision == "int8" and amx and has_amx_int8(tgt))
    return plan, PlanChoice("derived", "derived", why=why), opts


def _export(ex, tgt, plan, out: Path, bf16: bool = False) -> Path:
    """Writes the executable: model.so linked with the thread-pool constructor (thread_pool.py), and
    the bf16 kernel (bf16.py) when the model has bf16 layers, for an llvm target with a linker for
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
        from ..kernels.lowp.bf16 import SOURCE, object_file
        if cc is None:  # no linker for that architecture here: the objects, to link where it runs
            src = Path(work) / "lstm_export_threads.c"
            src.write_text(source(plan.threads))
            lib, tmp = out / "model.tar", out / ".model.tar.tmp.tar"
            ex.export_library(str(tmp), addons=[str(src)] + ([str(SOURCE)] if bf16 else []))
        else:
            objs = [thread_pool_object(work, plan.threads, cc)] + ([object_file(work, cc)] if bf16 else [])
            lib, tmp = out / "model.so", out / ".model.so.tmp.so"
            kwargs = {} if not is_cross(tgt) else {"cc": cc}
            ex.export_library(str(tmp), addons=[str(o) for o in objs], **kwargs)
        tmp.replace(lib)
    return lib


def _spec(s, static=None) -> dict:
    """A meta.json input or output: its declared shape, or the static one it was compiled for."""
    return {"name": s.name, "dtype": str(s.dtype), "shape": list(static if static is not None else s.shape)}
