"""`lstm-export compile`: the TVM artifact, and what compile chose on the way (tuning, the kernel
plan, bf16 engines), said in a few lines."""
from __future__ import annotations

from pathlib import Path

from lstm_export.common.errors import SymbolicShapeError, UserError

from .types import check_out_folder


def cmd_compile(args) -> int:
    try:
        from lstm_export.runtimes.tvm_lstm import CompileOptions, PlanChoice, compile_onnx
    except ImportError as e:
        raise UserError(f"compile needs apache-tvm ({e}); run ./scripts/setup.sh") from None
    _check_artifact_folder(Path(args.out), args.force)
    opts = options_from_args(args, CompileOptions)
    try:
        compiled = compile_onnx(args.model, args.out, opts)
    except SymbolicShapeError as e:
        raise UserError(_with_hint(e, args, opts)) from None
    lib, meta = compiled.library, compiled.meta
    if meta.tuning:
        _say_tuning(meta.tuning, meta.tuning_db)
    print(f"{meta.target_kind}: {lib} ({lib.stat().st_size / 1e6:.2f} MB) in {meta.compile_s:.1f} s; "
          f"main({', '.join(i['name'] for i in meta.inputs)}) -> {', '.join(o['name'] for o in meta.outputs)}")
    if meta.cpu:
        print(f"CPU kernel: {meta.cpu}; runs on {meta.num_cores} threads when loaded"
              + ("" if lib.suffix == ".so" else f" (cross-compiled: link {lib.name}'s objects where it runs)"))
    for n, layer in enumerate(meta.lowp_layers or []):
        timed = ", ".join(f"{k} {v:.3f} ms" for k, v in layer["timed_ms"].items())
        print(f"{meta.precision} LSTM layer {n}: {layer['engine']}/{layer['mode']} ({layer['chosen_by']}" +
              (f": {timed})" if timed else ")"))
    if meta.plan_selection:
        print(PlanChoice(**meta.plan_selection).summary())
    if meta.target_kind == "llvm":
        print(f"kernels from the tuning database: {meta.kernels_from_db}"
              + (f" ({meta.tuning_db})" if meta.tuning_db else " (none for this CPU; --tune makes one)"))
    return 0


def options_from_args(args, options_type):
    """The one CompileOptions of this command, made from its arguments (argparse has checked each
    value's form; CompileOptions checks what they mean together)."""
    from .types import parse_dims, parse_input_shapes, parse_input_values
    return options_type(target=args.target, arch=args.arch, threads=args.threads, tuning_db=args.tuning_db,
                        tune_trials=args.trials if args.tune else 0, dims=parse_dims(args.dim),
                        input_shapes=parse_input_shapes(args.input_shape),
                        input_values=parse_input_values(args.input_value), plan_budget_s=args.plan_budget_s,
                        precision=args.precision)


def _say_tuning(tuning: dict, folder) -> None:
    print(f"tuned {len(tuning['tasks'])} kernel(s) with {tuning['trials']} trials in {tuning['seconds']:.0f} s "
          f"into {folder}")
    for name in tuning["tasks"]:
        d, b = tuning["before_ms"].get(name), tuning["best_ms"].get(name)
        if d and b:
            print(f"  {name[:60]:<60} {d:9.4f} ms -> {b:9.4f} ms  ({d / b:.2f}x)")
    for name, why in tuning.get("skipped", {}).items():
        print(f"  {name[:60]:<60} not tuned: {why}")


def _with_hint(e, args, opts) -> str:
    """The failure, and the --input-shape arguments that make it compile when there are such
    (shape_hint compiles with them first; a hint that does not work is not given)."""
    from lstm_export.runtimes.source import open_model
    from lstm_export.runtimes.tvm_lstm import shape_hint
    fixed = opts.input_shapes or opts.dims or opts.input_values
    hint = None if fixed else shape_hint(open_model(args.model), opts)
    if hint is None:
        return f"{e}; run it with --runtime ort-cpu meanwhile, and report the model with this line"
    return (f"{e}; the model has symbolic input dims: compile it for the sizes you run, `lstm-export compile "
            f"{args.model} {hint[0]}` (numbers for the <names>; it compiles with {hint[1]})")


def _check_artifact_folder(out: Path, force: bool) -> None:
    """Before any compiling: --out must not hold a compiled model unless --force (replacing one
    silently loses work), and must be a folder we may write."""
    if not force and out.is_dir() and any((out / n).exists() for n in ("model.so", "model.tar", "meta.json")):
        raise UserError(f"--out {out} already holds a compiled model; pass --force to replace it")
    check_out_folder(out)
