"""CLI commands on the consumer side: export, runtimes, run, compare."""
from __future__ import annotations

import argparse
from pathlib import Path

from lstm_export.common.errors import UserError

from .compile_cmd import cmd_compile
from .types import SEED, check_writable, count, real

MODES = ("unrolled", "native", "streaming")


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint's model to ONNX")
    p.add_argument("checkpoint", help="ckpt.pt or its folder")
    p.add_argument("--mode", default="native", choices=[*MODES, "all"])
    p.add_argument("--out", required=True, help="the .onnx file, or a folder with --mode all")
    p.add_argument("--seq-len", type=count(1, 1_000_000), default=None, help="time steps (required for unrolled)")
    p.add_argument("--batch-size", type=count(1, 1_000_000), default=None, help="fix the batch axis (default: dynamic)")
    p.add_argument("--opset", type=count(7, 99), default=None, help="ONNX opset (default 17)")
    p.add_argument("--initial-state", action="store_true", help="add h_0, c_0 inputs (always on for streaming)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compile", help="compile an ONNX model with TVM to DIR/model.so + DIR/meta.json")
    p.add_argument("model", help="MODEL.onnx (native LSTM op or unrolled graph)")
    p.add_argument("--target", default="llvm",
                   help="llvm (this CPU), cuda, or a full TVM target to cross-compile for, as JSON or "
                        "'llvm -mcpu=haswell -num-cores=4' (mtriple, mcpu, mattr, num-cores); default: %(default)s")
    p.add_argument("--arch", default="sm_90", help="CUDA architecture (default: %(default)s)")
    p.add_argument("--threads", type=count(1, 4096), default=None,
                   help="cores the llvm target is laid out for (default: the target's num-cores, else this machine's)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="replace a compiled model already in --out")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                   help="fix a symbolic dimension before the graph is simplified (for shape arithmetic "
                        "that reads it); the others stay symbolic")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x512",
                   help="compile for this static shape of input NAME (repeatable): the symbolic dims it "
                        "binds are fixed everywhere, shape arithmetic on them folds away, and meta.json "
                        "records the shapes the artifact takes")
    p.add_argument("--input-value", action="append", default=[], metavar="NAME=NUMBER",
                   help="fix a scalar input to one value (e.g. sr=16000): an If on it folds to the branch "
                        "taken; the artifact refuses another value")
    p.add_argument("--plan-budget-s", type=real(0, 3600), default=None, metavar="S",
                   help="seconds compile may spend timing kernel plans on this machine and the model's shapes "
                        "before it keeps the fastest (choices are cached per CPU and shape; default: "
                        "$LSTM_EXPORT_PLAN_BUDGET_S, else 10; 0: the plan derived from the target)")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                   help="bf16: LSTM layers with bf16 weights and fp32 accumulation and state (CPUs with "
                        "AVX512-BF16; AMX tiles where the CPU has them); int8: int8 weights (AVX-512 VNNI) "
                        "where they pay, bf16 elsewhere; each layer's engine timed here within "
                        "--plan-budget-s (default: %(default)s)")
    p.add_argument("--tune", action="store_true",
                   help="first tune this model's generic kernels with MetaSchedule into the tuning database")
    p.add_argument(
        "--trials", type=count(1), default=64, help="measured candidates in all, with --tune (default: %(default)s)"
    )
    p.add_argument("--tuning-db", default=None, metavar="DIR",
                   help="MetaSchedule database folder (default: the committed one for this CPU and core count; "
                        "'none' compiles without one)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("bench", help="time every runtime on LSTM shapes, or on MODEL (outputs checked equal first)")
    p.add_argument(
        "model", nargs="?", default=None, help="time this model (.onnx or compiled folder) instead of the LSTM shapes"
    )
    p.add_argument("--runtimes", default=None,
                   help="with MODEL: comma-separated (default: every available ONNX runtime)")
    p.add_argument("--reference", default=None, help="with MODEL: runtime whose outputs the others must match "
                                                     "(default: the first)")
    p.add_argument("--inputs", default=None, help="with MODEL: .npz of inputs (default: random, see --seed/--dim)")
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    _add_random_args(p)
    p.add_argument("--no-cache", action="store_true", help="with MODEL: tvm-* compile into a temporary folder")
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="T,B,I,H[,LAYERS]",
        help="add a shape (repeatable); --only-shapes drops the default ones",
    )
    p.add_argument("--only-shapes", action="store_true", help="run only the --shape shapes")
    p.add_argument("--entries", default=None, help="comma-separated entry labels (default: every CPU entry)")
    p.add_argument("--threads", type=count(1, 4096), default=None,
                   help="threads for every runtime (default: all cores)")
    p.add_argument("--target", default=None,
                   help="build the tvm-llvm entries for this TVM target (e.g. 'llvm -mcpu=haswell': the AVX2 "
                        "kernel on an AVX-512 machine; default: this CPU)")
    p.add_argument("--min-s", type=real(0, 3600, low_open=True), default=1.0,
                   help="seconds of timed runs per entry, at least")
    p.add_argument("--rounds", type=count(1, 1000), default=3,
                   help="interleaved timing rounds per shape, each entry min-s/rounds per round (default 3)")
    p.add_argument("--check-alone", action="store_true",
                   help="also time each peer in a second series of fresh processes, interleaved, and report rows "
                        "more than 10%% off (the machine's process-to-process noise)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot", default=None, help="write a PNG bar chart here")
    p.add_argument("--markdown", default=None, help="write the table as markdown here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("runtimes", help="list runtimes and whether they can run here")
    p.set_defaults(func=cmd_runtimes)

    p = sub.add_parser("run", help="run any ONNX model (or a compiled folder) on one runtime")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--runtime", default="ort-cpu")
    p.add_argument("--inputs", default=None, help=".npz keyed by graph input name (default: random inputs)")
    p.add_argument("--outputs", required=True, help=".npz to write, keyed by graph output name")
    _add_random_args(p)
    p.add_argument("--checkpoint", default=None, help="for the torch runtimes: the model's checkpoint")
    _add_contract_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="run one model on several runtimes and compare every output")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--runtimes", default=None, help="comma-separated (default: every available ONNX runtime)")
    p.add_argument("--checkpoint", default=None, help="also run our torch model and torch.nn.LSTM on these weights")
    p.add_argument("--reference", default=None, help="runtime taken as truth (default: torch with a checkpoint, "
                                                     "else the first runtime)")
    p.add_argument("--inputs", default=None, help=".npz of inputs (default: random, see --seed/--dim)")
    _add_random_args(p)
    p.add_argument("--atol", type=real(0), default=1e-5)
    p.add_argument("--rtol", type=real(0), default=1e-4)
    p.add_argument("--tol", action="append", default=[], metavar="OUTPUT=ATOL[:RTOL]", help="per-output tolerance")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--plot", default=None, help="write a PNG of error against time step here")
    p.add_argument("--long", type=count(0, 10_000_000), default=0, metavar="T",
                   help="also run T steps in float32 against the float64 reference (needs --checkpoint)")
    p.add_argument("--long-atol", type=real(0), default=1e-4)
    _add_contract_args(p)
    p.set_defaults(func=cmd_compare)


MODEL_HELP = ("MODEL.onnx, or a folder written by `compile` (its model.so runs on tvm-*, its model.onnx on "
              "the others; nothing is compiled again)")


def _add_contract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-nonfinite", action="store_true", help="run NaN/Inf inputs instead of refusing them")
    p.add_argument("--no-cache", action="store_true",
                   help="tvm-* on an .onnx: compile into a temporary folder, not the compile cache "
                        "($XDG_CACHE_HOME/lstm-export, capped at LSTM_EXPORT_CACHE_MB, default 2048)")


def _add_random_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=SEED, default=0, help="seed for random inputs")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=N", help="size of a symbolic dimension")


def cmd_export(args) -> int:
    from lstm_export import checkpoint as ckpt_io
    from lstm_export.export import export_onnx
    out = Path(args.out)
    if args.mode == "all" and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; --mode all writes a folder")
    if args.mode != "all" and out.is_dir():
        raise UserError(f"--out {out} is a folder; name the .onnx file to write (or use --mode all)")
    check_writable(out / "model.native.onnx" if args.mode == "all" else out)  # before loading anything
    ck = ckpt_io.load(args.checkpoint)
    model = ck.build_model()
    modes = MODES if args.mode == "all" else (args.mode,)
    if args.mode == "all" and ck.model_config.cell == "layernorm":
        print("note: a LayerNorm LSTM has no native ONNX op; exporting the unrolled graph only")
        modes = ("unrolled",)
    for mode in modes:
        path = out / f"model.{mode}.onnx" if args.mode == "all" else out
        seq_len = args.seq_len or (64 if mode == "unrolled" and args.mode == "all" else None)
        export_onnx(model, path, mode, seq_len=seq_len, batch_size=args.batch_size, opset=args.opset,
                    initial_state=args.initial_state)
        print(f"{mode}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def cmd_bench(args) -> int:
    from lstm_export.harness.bench import DEFAULT_SHAPES, Shape, bench, plot
    check_writable(args.json, args.plot, args.markdown)
    if args.model is not None:
        return _bench_model(args)
    extra = [Shape.parse(s) for s in args.shape]
    if args.only_shapes and not extra:
        raise UserError("--only-shapes needs at least one --shape")
    shapes = extra if args.only_shapes else DEFAULT_SHAPES + extra
    entries = [e.strip() for e in args.entries.split(",")] if args.entries else None
    report = bench(shapes, entries, args.threads, min_s=args.min_s, rounds=args.rounds, target=args.target,
                   check_alone=args.check_alone)
    print(report.header())
    print(report.table())
    from lstm_export.harness.bench_alone import off_alone
    for line in off_alone(report.timings):
        print(line)
    if args.json:
        report.to_json(args.json)
    if args.plot:
        plot(report, args.plot)
    if args.markdown:
        Path(args.markdown).write_text(f"{report.header()} {report.threads} threads, float32, median of "
                                       f"repeated runs after warm-up, in {args.rounds} interleaved rounds, each "
                                       "peer in a fresh process of its own per round; "
                                       "ratio = median / best peer's median (peers: torch.nn.LSTM, ort-cpu native, "
                                       "ort-cpu unrolled, openvino native); % of peak = GFLOP/s / the "
                                       f"measured FMA peak of the ISA the entry runs.\n\n"
                                       f"{report.markdown()}\n")
    return 0


def _bench_model(args) -> int:
    """`bench MODEL`: the user's model on every runtime named, checked equal, then timed."""
    from lstm_export.harness.bench import plot
    from lstm_export.harness.model_bench import bench_model
    from lstm_export.runtimes.source import open_model
    if args.shape or args.only_shapes or args.entries or args.target:
        raise UserError("--shape, --only-shapes, --entries and --target time the LSTM shapes; with MODEL use "
                        "--runtimes (and compile MODEL for another target first)")
    source = open_model(args.model)
    names = _runtime_names(args)
    reference = args.reference or names[0]
    feeds, _ = _feeds(args, source)
    source.check_feeds(feeds)
    rts = [_runtime(n, None, args.no_cache, args.threads) for n in dict.fromkeys([reference, *names])]
    import os
    report = bench_model(source, rts, feeds, reference=rts[0], min_s=args.min_s, rounds=args.rounds,
                         threads=args.threads or len(os.sched_getaffinity(0)))  # runtimes default to every core
    print(report.table())
    if args.json:
        report.to_json(args.json)
    if args.plot:
        plot(report, args.plot)
    if args.markdown:
        Path(args.markdown).write_text(f"{report.header()} Median of repeated runs after warm-up in {args.rounds} "
                                       "interleaved rounds; outputs checked equal to the reference first; ratio = "
                                       f"median / fastest non-TVM runtime's median.\n\n{report.markdown()}\n")
    return 0


def cmd_runtimes(args) -> int:
    from lstm_export.runtimes import list_runtimes
    for name, avail in list_runtimes().items():
        print(f"{name:<18}{'available' if avail else avail.reason}")
    return 0


def _feeds(args, source):
    from lstm_export.runtimes.model_io import load_feeds, random_feeds

    from .types import parse_dims
    if args.inputs:
        return load_feeds(args.inputs), None
    return random_feeds(source, args.seed, parse_dims(args.dim)), args.seed


def _runtime(name: str, checkpoint, no_cache: bool = False, threads: int | None = None):
    from lstm_export.runtimes.base import RuntimeOptions, create, runtime_class
    if not runtime_class(name).needs_model and not checkpoint:
        raise UserError(f"runtime {name} runs our model, not an ONNX file: pass --checkpoint CKPT")
    return create(name, RuntimeOptions(threads=threads or None, checkpoint=checkpoint or None,
                                       cache=False if no_cache else None))


def cmd_run(args) -> int:
    from lstm_export.runtimes.model_io import save_outputs
    from lstm_export.runtimes.source import open_model
    check_writable(args.outputs)
    source = open_model(args.model)
    feeds, _ = _feeds(args, source)
    source.check_feeds(feeds, args.allow_nonfinite)  # before any compiling
    with _runtime(args.runtime, args.checkpoint, args.no_cache) as rt:
        rt.prepare(source, allow_nonfinite=args.allow_nonfinite)
        outputs = rt.run(feeds)
    save_outputs(args.outputs, outputs)
    print(f"{args.runtime}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in outputs.items()) + f" -> {args.outputs}")
    return 0


def _parse_tols(items: list[str]) -> dict[str, tuple[float, float]]:
    tols = {}
    for item in items:
        name, sep, vals = item.partition("=")
        try:
            a, _, r = vals.partition(":")
            tols[name] = (float(a), float(r) if r else 1e-4)
        except ValueError:
            sep = ""
        if not sep or not all(0 <= v < float("inf") for v in tols.get(name, (-1,))):
            raise UserError(f"--tol expects OUTPUT=ATOL[:RTOL] with finite tolerances >= 0, got {item!r}")
    return tols


def _runtime_names(args) -> list[str]:
    from lstm_export.runtimes.base import ONNX_RUNTIMES, list_runtimes
    if args.runtimes is not None:
        names = list(dict.fromkeys(n.strip() for n in args.runtimes.split(",") if n.strip()))
        if not names:
            raise UserError(f"--runtimes {args.runtimes!r} names no runtime; e.g. --runtimes ort-cpu,tvm-llvm")
    else:
        avail = list_runtimes()
        names = [n for n in ONNX_RUNTIMES if avail[n]]
    if args.checkpoint:
        from lstm_export import checkpoint as ckpt_io
        lstm_kind = ckpt_io.load(args.checkpoint).model_config.cell
        extra = ["torch"] + (["torch-nn"] if lstm_kind == "lstm" else [])
        names = [n for n in extra if n not in names] + names
    return names


def cmd_compare(args) -> int:
    from lstm_export.harness.compare import compare, plot_errors
    from lstm_export.runtimes.model_io import random_feeds
    from lstm_export.runtimes.source import open_model
    check_writable(args.report, args.plot)
    source = open_model(args.model)
    names = _runtime_names(args)
    reference = args.reference or names[0]
    if reference not in names:
        names.insert(0, reference)
    tols = _parse_tols(args.tol)
    if args.long:
        if not args.checkpoint:
            raise UserError("--long compares against the float64 reference, which needs --checkpoint")
        if not any(d == "time" for s in source.inputs for d in s.shape):
            raise UserError("--long needs a model with a dynamic time axis; export with --mode native or streaming")
    rts = {n: _runtime(n, args.checkpoint, args.no_cache) for n in names}
    feeds, seed = _feeds(args, source)
    # each runtime is prepared once (TVM compiles or loads once) for both comparisons; one that
    # cannot load is a row of the report, like one that fails to run
    failed = {}
    for n, rt in rts.items():
        try:
            rt.prepare(source)
        except UserError as e:
            if n == reference:
                raise
            failed[n] = e
    try:
        report = compare(source, [rts[n] for n in names if n not in failed], feeds, reference=rts[reference],
                         atol=args.atol, rtol=args.rtol, tolerances=tols, seed=seed,
                         allow_nonfinite=args.allow_nonfinite)
        _add_failures(report, failed)
        print(report.table())
        if args.report:
            report.to_json(args.report)
        if args.plot:
            plot_errors(report, args.plot)
        ok = report.passed
        if args.long:
            long_feeds = random_feeds(source, seed or 0, {"time": args.long, "batch": 1})
            onnx_rts = [rts[n] for n in names if n not in failed and n != "torch-nn"]
            long_rep = compare(source, [_runtime("numpy-f64", args.checkpoint)] + onnx_rts, long_feeds,
                               atol=args.long_atol, rtol=0.0, seed=seed)
            print(f"\nlong-sequence fidelity: float32 over T={args.long} against the float64 reference")
            print(long_rep.table())
            if args.report:
                long_rep.to_json(Path(args.report).with_suffix(".long.json"))
            ok = ok and long_rep.passed
    finally:
        for rt in rts.values():
            rt.release()
    return 0 if ok else 1


def _add_failures(report, failed: dict) -> None:
    from lstm_export.harness.compare import RuntimeResult
    report.results += [RuntimeResult(n, error=str(e)) for n, e in failed.items()]
