"""`compile`: ONNX -> Relax (with our converters) -> a Relax VM library for llvm or cuda, as named
stages over one CompileOptions value, each a function a test can call alone:

    prepare_graph -> kernel_setup -> import_graph -> open_tuning -> choose_plan -> build -> write_artifact

prepare_graph simplifies the ONNX graph for TVM (shapes and values the options fix folded in);
kernel_setup says how the kernels are laid out (the plan derived from the target, or reduced
precision's engines); import_graph and build are importer.py and builder.py; choose_plan times
candidate plans through a build function it is given (plan_select.py) and hands back the winner
built, never run; write_artifact writes the library and meta.json (source.ArtifactMeta).

The artifact is DIR/model.so (`export_library`), whose `main` takes the graph inputs in graph order
and returns the graph outputs in graph order, DIR/meta.json describing them, and DIR/model.onnx.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lstm_export.common.errors import UserError

from ...source import SOURCE_ONNX, ArtifactMeta, CompiledModel, ModelSource, open_model
from ..frontend.convert_options import ConvertOptions
from ..target.targets import arch_of, cuda_target, host_target, is_cross, parse_target  # noqa: F401 (API)
from .builder import Built, build, export_library, legalize_cpu
from .importer import import_onnx
from .options import CompileOptions, options_from


@dataclass(frozen=True)
class PreparedGraph:
    """The ONNX graph as TVM will import it, and what the options fixed in it."""

    source: ModelSource
    model: object  # onnx.ModelProto, simplified
    static: dict  # input name -> the static shape it was compiled for (--input-shape)
    dims: dict  # symbolic dim -> size (--dim, and those --input-shape binds)
    values: dict  # scalar input -> the value folded in (--input-value)


@dataclass(frozen=True)
class KernelSetup:
    """How the kernels are laid out: the target, the CPU kernel's plan (None on CUDA), what chose
    it (plan_select.PlanChoice; source "measured" while the choice is still to be timed), and the
    reduced-precision options (kernels.lowp.layer.LowpOptions) with --precision bf16|int8."""

    target: object  # tvm.target.Target
    plan: object | None
    choice: object | None
    lowp: object | None = None

    @property
    def convert(self) -> ConvertOptions:
        return ConvertOptions(cuda=self.target.kind.name == "cuda", plan=self.plan, lowp=self.lowp)

    @property
    def lanes(self) -> int:
        return self.plan.lanes if self.plan else 16


@dataclass(frozen=True)
class Tuning:
    """The MetaSchedule database the build schedules from (None: none), its folder, and what
    --tune measured (None without --tune)."""

    database: object | None = None
    folder: Path | None = None
    tuned: object | None = None


def compile_onnx(model_path: str | Path | ModelSource, out_dir: str | Path, options: CompileOptions | None = None,
                 **fields) -> CompiledModel:
    """Compiles an ONNX model (any whose ops TVM and our converters support, as a path or an opened
    source.ModelSource); writes OUT/model.so (or, cross-compiled with no linker for that
    architecture here, OUT/model.tar of objects), OUT/meta.json and OUT/model.onnx (the source, so
    every runtime can run the folder); returns the CompiledModel. `options`, or CompileOptions made
    from `fields` (target="llvm", precision="bf16", ...; see options.py), or `options` with `fields`
    replaced."""
    opts = options_from(options, fields)
    graph = prepare_graph(open_model(model_path), opts)
    setup = kernel_setup(parse_target(opts.target, opts.threads, opts.arch), opts)
    t0 = time.perf_counter()
    mod = import_graph(graph, setup, opts.precision)
    tuning = open_tuning(mod, setup.target, opts)
    if tuning.tuned is not None:
        t0 = time.perf_counter()  # compile time is what a deployment pays, without the tuning
    built = None
    if setup.choice is not None and setup.choice.source == "measured":
        setup, built = choose_plan(graph, setup, mod, tuning, opts.progress)
        if built is None and setup.choice.chosen != "derived":  # chosen from the plan cache: built here
            mod = import_graph(graph, setup, opts.precision)
    if built is None:
        built = build(graph.model, mod, setup.target, tuning.database, setup.lanes)
    return write_artifact(Path(out_dir), graph, setup, built, tuning, time.perf_counter() - t0, opts.precision)


def prepare_graph(source: ModelSource, opts: CompileOptions) -> PreparedGraph:
    """The graph with the options' shapes, dims and values folded in, and what TVM's importer cannot
    take simplified away (simplify.py); open input dims named (open_dims.py: unnamed and -1 dims);
    slice bounds clamped (a flip's end=-INT64_MAX overflows TVM's int64 on a symbolic axis)."""
    from ...model_io import bind_shapes
    from ..frontend.open_dims import name_open_dims
    from ..frontend.simplify import needs_simplifying, simplify
    from ..frontend.slice_bounds import clamp_slice_bounds
    model, dims, values = source.onnx(), dict(opts.dims), dict(opts.input_values)
    static = {}
    if opts.input_shapes:
        static, dims = bind_shapes(source.inputs, dict(opts.input_shapes), dims)
    if dims or static or values or needs_simplifying(model):  # shape arithmetic TVM cannot take: folded first
        model = simplify(model, dims, static, values, source.inputs)
    return PreparedGraph(source, clamp_slice_bounds(name_open_dims(model)), static, dims or {}, values)


def kernel_setup(tgt, opts: CompileOptions) -> KernelSetup:
    """The plan the kernels are laid out by and what chose it: opts.plan as given; for an llvm
    target this machine runs, "measured" (choose_plan times it) unless the budget is 0; else the
    plan derived from the target. With --precision bf16|int8 the fp32 plan is derived (it lays out
    any other kernels) and each LSTM layer's engine is timed at import instead (lowp_setup)."""
    from ..kernels.cpu_plan import is_host, plan_for
    from .plan_select import PlanChoice
    if opts.precision != "fp32":
        return lowp_setup(tgt, opts)
    if tgt.kind.name != "llvm":
        return KernelSetup(tgt, None, None)
    if opts.plan is not None:
        return KernelSetup(tgt, opts.plan, None)
    budget = opts.plan_budget_s
    why = ("--plan-budget-s 0" if budget == 0 else None) or \
        (None if is_host(tgt) else "the target is not this machine: nothing to measure on")
    choice = PlanChoice("derived", "derived", why=why) if why else PlanChoice("measured", "derived", budget_s=budget)
    return KernelSetup(tgt, plan_for(tgt), choice)


def lowp_setup(tgt, opts: CompileOptions) -> KernelSetup:
    """compile --precision bf16 or int8: the fp32 plan derived, and the LowpOptions that time each
    LSTM layer's engine on this machine (at most 3 s a distinct layer, within the plan budget)."""
    from tvm.target import codegen

    from ..kernels.cpu_plan import is_host, plan_for
    from ..kernels.lowp.engine import has_amx_int8, require
    from ..kernels.lowp.layer import LowpOptions
    from ..target.thread_pool import compiler_for
    from .plan_select import PlanChoice
    precision = opts.precision
    if tgt.kind.name != "llvm":
        raise UserError(f"--precision {precision} is a CPU path (llvm targets); compile for cuda at fp32")
    dot, amx = require(tgt, precision)
    plan, host = opts.plan or plan_for(tgt), is_host(tgt)
    cc = compiler_for(codegen.llvm_get_system_triple(), codegen.llvm_get_system_triple()) if host else None
    measure = min(opts.plan_budget_s, 3.0) if host and cc else 0.0  # per distinct layer
    why = f"--precision {precision}: each LSTM layer's engine is chosen instead (lowp_layers)"
    lowp = LowpOptions(amx=amx, threads=plan.threads, l2_bytes=plan.info.l2 if plan.info else 1 << 20,
                       measure_s=measure, cc=cc, dot=dot, int8=precision == "int8",
                       amx8=precision == "int8" and amx and has_amx_int8(tgt))
    return KernelSetup(tgt, plan, PlanChoice("derived", "derived", why=why), lowp)


def import_graph(graph: PreparedGraph, setup: KernelSetup, precision: str = "fp32"):
    """The Relax IRModule of the graph with the setup's kernels; reduced precision on a model
    without an LSTM layer it can take is refused."""
    mod = import_onnx(graph.model, setup.convert)
    if setup.lowp is not None and not setup.lowp.layers:
        raise UserError(f"--precision {precision}: this model has no LSTM layer with constant weights to compute "
                        f"in {precision}; compile it at fp32 (the default)")
    return mod


def open_tuning(mod, tgt, opts: CompileOptions) -> Tuning:
    """The tuning database for an llvm build (the committed one for this CPU by default), after
    tuning this module's generic kernels into it with --tune."""
    if tgt.kind.name != "llvm":
        if opts.tune_trials > 0:
            raise UserError("--tune works with llvm targets only (CUDA kernels are scheduled by dlight)")
        return Tuning()
    if opts.no_tuning_db:
        if opts.tune_trials > 0:
            raise UserError("--tune writes into a tuning database, and --tuning-db none names none: give a "
                            "folder, or leave --tuning-db out for the default one")
        return Tuning()
    from .tuning import default_db_dir, open_database, tune
    folder = Path(opts.tuning_db) if opts.tuning_db else default_db_dir(tgt)
    tuned = None
    if opts.tune_trials > 0:
        if is_cross(tgt):
            raise UserError("--tune measures on this machine; it cannot tune for another architecture")
        tuned = tune(legalize_cpu(mod, tgt), tgt, folder, opts.tune_trials, progress=opts.progress)
    database = open_database(folder)
    if database is None and opts.tuning_db and not opts.tune_trials:  # asked for one that is not there
        raise UserError(f"--tuning-db {folder} holds no MetaSchedule database; make one with "
                        f"`lstm-export compile MODEL.onnx --tune --trials N --tuning-db {folder}`")
    return Tuning(database, folder if database is not None else None, tuned)


@dataclass(frozen=True)
class PlanBuilder:
    """What plan selection is handed to make its candidates: the graph imported with a plan, and a
    module built, in this compile's setup and tuning database. It calls nothing above it."""

    graph: PreparedGraph
    setup: KernelSetup
    tuning: Tuning

    def module(self, plan):
        return import_onnx(self.graph.model, dataclasses.replace(self.setup.convert, plan=plan))

    def build(self, plan, module) -> Built:
        return build(self.graph.model, module, self.setup.target, self.tuning.database, plan.lanes)


def choose_plan(graph: PreparedGraph, setup: KernelSetup, derived_mod, tuning: Tuning,
                progress: bool = True) -> tuple[KernelSetup, Built | None]:
    """plan_select.select on random inputs at the artifact's shapes (main's arguments, in order):
    (the setup with the chosen plan, that plan built and never run; None when the choice came from
    the plan cache, and the chosen plan is built by the caller, once)."""
    from .plan_select import select, timing_feeds
    feeds = timing_feeds(graph.source, graph.static, graph.dims)
    feeds = {s.name: feeds[s.name] for s in graph.source.inputs if s.name not in graph.values}

    def say(text):  # a few seconds in all: one line per candidate, on a terminal or not
        print(f"compile: building {text} to time it", file=sys.stderr, flush=True)
    plan, built, choice = select(graph.model, setup.target, setup.plan, PlanBuilder(graph, setup, tuning), feeds,
                                 setup.choice.budget_s, derived_mod=derived_mod, progress=say if progress else None)
    return dataclasses.replace(setup, plan=plan, choice=choice), built


def write_artifact(out: Path, graph: PreparedGraph, setup: KernelSetup, built: Built, tuning: Tuning,
                   compile_s: float, precision: str = "fp32") -> CompiledModel:
    """The library (export_library), the source ONNX as model.onnx, and meta.json last: a folder
    with meta.json is complete."""
    from ..target.native_log import native_stderr_to_log
    out.mkdir(parents=True, exist_ok=True)
    with native_stderr_to_log("TVM export"):
        lib = export_library(built.executable, setup.target, setup.plan, out, setup.lowp is not None)
    meta = artifact_meta(graph, setup, built, tuning, compile_s, precision, library=lib.name)
    source = graph.source
    if source.onnx_path.resolve() != (out / SOURCE_ONNX).resolve():
        shutil.copyfile(source.onnx_path, out / f".{SOURCE_ONNX}.tmp")
        (out / f".{SOURCE_ONNX}.tmp").replace(out / SOURCE_ONNX)
    meta.write(out)
    return CompiledModel(out, lib, meta)


def artifact_meta(graph: PreparedGraph, setup: KernelSetup, built: Built, tuning: Tuning, compile_s: float,
                  precision: str, library: str) -> ArtifactMeta:
    """What meta.json says of this build."""
    import tvm
    from tvm.target import codegen
    tgt, plan, source = setup.target, setup.plan, graph.source
    fields = dict(
        inputs=[_spec(s, graph.static.get(s.name)) for s in source.inputs if s.name not in graph.values],
        outputs=[_spec(s) for s in source.outputs],
        target=str(tgt.export()) if hasattr(tgt, "export") else str(tgt), target_kind=tgt.kind.name,
        tvm_version=tvm.__version__, source=str(source.path), onnx_sha256=source.digest,
        index_bounds=source.index_bounds, length_inputs=source.length_inputs, input_widths=source.input_widths,
        dims=dict(graph.dims),
        input_shapes={k: list(v) for k, v in graph.static.items()}, input_values=graph.values,
        compile_s=round(compile_s, 3), tuning_db=str(tuning.folder) if tuning.database is not None else None,
        kernels_from_db=built.kernels_from_db, owned_outputs=built.owned_outputs, library=library,
        precision=precision, lowp_layers=setup.lowp.layers if setup.lowp is not None else None)
    if plan is not None:
        fields.update(
            num_cores=plan.threads, cpu=plan.info.describe() if plan.info else None,
            kernel_plan={k: v for k, v in dataclasses.asdict(plan).items() if k != "info"},
            plan_selection=dataclasses.asdict(setup.choice) if setup.choice is not None else None,
            cross_compiled=is_cross(tgt) or str(tgt.attrs.get("mcpu", "")) != codegen.llvm_get_system_cpu(),
            arch=arch_of(tgt.attrs.get("mtriple") or codegen.llvm_get_system_triple()))
    if tuning.tuned is not None:
        t = tuning.tuned
        fields["tuning"] = {"trials": t.trials, "seconds": t.seconds, "tasks": t.tasks, "before_ms": t.before_ms,
                            "best_ms": t.best_ms, "skipped": t.skipped}
    return ArtifactMeta(**fields)


def _spec(s, static=None) -> dict:
    """A meta.json input or output: its declared shape, or the static one it was compiled for."""
    return {"name": s.name, "dtype": str(s.dtype), "shape": list(static if static is not None else s.shape)}
