"""MetaSchedule tuning of the generic kernels, and the tuning database that `compile` reads.

Our LSTM kernels (marks.is_ours) are hand-scheduled TIR and are never tuned. Every other PrimFunc that TVM
legalizes from the graph (the unrolled graph's MatMuls, gate math, splits and concats; the char LM's
head) is a tuning task when its shapes are static. Skipped:
- dynamic-shape kernels: MetaSchedule measures concrete buffers;
- kernels with more than MAX_PARAMS buffers: the unrolled graph's split of the input into T steps and
  concat of the T outputs. Their TIR grows with T (0.25-0.6 MB of database each at T=50), and tuning
  them gained 0-3% when measured;
- kernels with an integer buffer (the embedding's gather): MetaSchedule's runner fills buffers with
  random values, and random indices read out of bounds.

Before the search, each task's database gets the schedule that compile uses without tuning (see
generic_schedule.default_schedule, or the plain loop nest), measured by the same runner. Compile takes the
fastest record per kernel, so a tuned schedule replaces the default only where it measured faster.

Databases are per target (`llvm-<mcpu>-<cores>c`): a schedule measured on one CPU is not evidence
for another. The committed one for this machine lives in tuning_db/ beside this file.
"""
from __future__ import annotations

import functools
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

from lstm_export.common.errors import UserError

from ..kernels.marks import is_ours

DB_ROOT = Path(__file__).with_name("tuning_db")
MAX_PARAMS = 16
_DB_FILES = ("database_workload.json", "database_tuning_record.json")


def target_key(target) -> str:
    """'llvm-rocketlake-2c': the kind, CPU and core count a database was measured on."""
    attrs = target.attrs
    return f"{target.kind.name}-{attrs.get('mcpu', 'generic')}-{int(attrs.get('num-cores', 1))}c"


def default_db_dir(target) -> Path:
    return DB_ROOT / target_key(target)


def open_database(db_dir: str | Path, create: bool = False):
    """The JSON database in db_dir, or None when there is none (and `create` is off)."""
    from tvm.s_tir import meta_schedule as ms
    d = _recovered(Path(db_dir))
    files = [d / f for f in _DB_FILES]
    if not create and not all(f.is_file() for f in files):
        return None
    if not create:  # read-only use: one parse per file version and process (compile reads it every time)
        try:
            return _read_only(*(str(f.resolve()) for f in files), *(f.stat().st_mtime_ns for f in files))
        except Exception as e:  # TVM's parser raises RuntimeError from its C++ side for any bad line
            why = str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__
            raise UserError(f"{d} is not a readable MetaSchedule database ({why}); remove it, or pass "
                            "--tuning-db none to compile without one") from None
    d.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=str(files[0]), path_tuning_record=str(files[1]),
                                    allow_missing=True)


@functools.lru_cache(maxsize=8)
def _read_only(workload: str, records: str, *_mtimes):
    from tvm.s_tir import meta_schedule as ms
    return ms.database.JSONDatabase(path_workload=workload, path_tuning_record=records, allow_missing=False)


def task_module(func):
    """The IRModule a database keys a kernel by (what MetaScheduleApplyDatabase looks up)."""
    import tvm
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def tunable(mod) -> list[tuple[str, object]]:
    """(name, PrimFunc) of each kernel in a legalized module that tuning can take (see the docstring)."""
    from tvm import tirx
    from tvm.s_tir import meta_schedule as ms
    found = []
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or is_ours(func):
            continue
        if func.attrs and "tirx.is_scheduled" in func.attrs or len(func.params) > MAX_PARAMS:
            continue
        try:
            args = ms.arg_info.ArgInfo.from_prim_func(func)
        except Exception:  # noqa: BLE001 -- e.g. a scalar or symbolic parameter: not measurable
            continue
        if all(isinstance(d, int) for a in args for d in getattr(a, "shape", [None])) and \
                all(str(a.dtype).startswith("float") for a in args):
            found.append((gv.name_hint, func))
    return found


def apply_database(mod, target, db) -> tuple[object, int]:
    """mod with every kernel the database knows replaced by its fastest record; and how many were."""
    import tvm
    from tvm import relax, tirx

    def scheduled(m):
        return sum(1 for f in m.functions.values()
                   if isinstance(f, tirx.PrimFunc) and f.attrs and "tirx.is_scheduled" in f.attrs)
    before = scheduled(mod)
    with target, db, tvm.transform.PassContext(opt_level=3):
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    return mod, scheduled(mod) - before


@dataclass
class TuneReport:
    db_dir: str
    tasks: list[str]
    trials: int = 0
    seconds: float = 0.0
    # per task: ms of its best record before this run (the untuned schedule, on a first run) and after
    before_ms: dict[str, float] = field(default_factory=dict)
    best_ms: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why its untuned schedule failed


def tune(mod, target, db_dir: str | Path, trials: int, progress: bool = True, seed: int = 0) -> TuneReport:
    """Tunes the kernels of a legalized module into the database in db_dir (created or extended).

    `trials` is the total number of measured candidates over all tasks.
    """
    import shutil
    import tempfile

    from tqdm import tqdm
    from tvm.s_tir import meta_schedule as ms
    if trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    tasks = tunable(mod)
    report = TuneReport(str(db_dir), [name for name, _ in tasks])
    if not tasks:
        return report
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lstm-export-tune-") as work:
        # Tune into a copy, then write the best record per kernel to a new folder and swap it in
        # (_replace_database): an interrupted run leaves the old database as it was, and the
        # committed one stays small.
        scratch = Path(work) / "db"
        scratch.mkdir()
        current = _recovered(Path(db_dir))
        for f in _DB_FILES:
            if (current / f).is_file():
                shutil.copyfile(current / f, scratch / f)
        db = open_database(scratch, create=True)
        builder, runner = ms.builder.LocalBuilder(f_build=build_candidate), ms.runner.LocalRunner()
        _seed_defaults(tasks, target, db, builder, runner, report)
        tasks = [(name, func) for name, func in tasks if name not in report.skipped]
        if not tasks:
            return report
        bar = tqdm(total=trials, disable=not progress, desc="tune", unit="trial")
        strategy = ms.search_strategy.EvolutionarySearch(population_size=128, init_min_unmeasured=16)
        contexts = [ms.TuneContext(mod=task_module(func), target=target, space_generator="post-order-apply",
                                   search_strategy=strategy, task_name=name, rand_state=seed + i,
                                   num_threads=1).clone()
                    for i, (name, func) in enumerate(tasks)]
        cost_model = "xgb" if importlib.util.find_spec("xgboost") else "random"
        ms.tune.tune_tasks(tasks=contexts, task_weights=[1.0] * len(contexts), work_dir=work,
                           max_trials_global=trials, num_trials_per_iter=min(16, trials), builder=builder,
                           runner=runner, database=db, cost_model=cost_model,
                           measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                                              _progress_callback(bar, [n for n, _ in tasks], report)],
                           task_scheduler="round-robin")
        bar.close()
        for name, func in tasks:
            best = db.get_top_k(db.commit_workload(task_module(func)), 1)
            if best:
                report.best_ms[name] = round(_mean(best[0].run_secs) * 1e3, 6)
        _replace_database(db, Path(db_dir))
    report.seconds = round(time.perf_counter() - t0, 1)
    return report


def _recovered(d: Path) -> Path:
    old = d.with_name(d.name + ".old")
    if not d.exists() and old.is_dir():  # a re-tune died between its two renames (_replace_database)
        old.rename(d)
    return d


def _replace_database(db, db_dir: Path) -> None:
    """Writes db's best record per kernel to db_dir. The two files of a database index each other, so
    they are swapped in as a folder: DIR.new is filled, DIR moves to DIR.old, DIR.new to DIR. A crash
    between the two moves leaves DIR.old, which open_database falls back to."""
    import shutil
    new, old = db_dir.with_name(db_dir.name + ".new"), db_dir.with_name(db_dir.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    db.dump_pruned(open_database(new, create=True))
    shutil.rmtree(old, ignore_errors=True)
    if db_dir.exists():
        db_dir.rename(old)
    new.rename(db_dir)
    shutil.rmtree(old, ignore_errors=True)


def plain_schedule(mod):
    """The kernel's plain loop nest as a schedule a database takes: a record needs one instruction
    in its trace to count as valid, and this one changes nothing."""
    from tvm import s_tir
    sch = s_tir.Schedule(mod)
    sch.get_child_blocks(sch.get_sblock("root"))
    return sch


def _seed_defaults(tasks, target, db, builder, runner, report: TuneReport) -> None:
    """Measures and records the untuned schedule of every task the database has no record of."""
    from tvm.s_tir import meta_schedule as ms

    from ..kernels.cpu_plan import plan_for
    from ..kernels.generic_schedule import default_schedule
    lanes = plan_for(target).lanes
    todo = []
    for name, func in tasks:
        mod = task_module(func)
        workload = db.commit_workload(mod)
        top = db.get_top_k(workload, 1)
        if top:
            report.before_ms[name] = round(_mean(top[0].run_secs) * 1e3, 6)
            continue
        sch = default_schedule(mod["main"], lanes)
        if sch is None:
            sch = plain_schedule(mod)
        todo.append((name, func, workload, sch))
    if not todo:
        return
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for *_, sch in todo])
    for (name, func, workload, sch), b in zip(todo, built):
        if b.error_msg:
            report.skipped[name] = "does not build: " + _first_error_line(b.error_msg)
            continue
        args = ms.arg_info.ArgInfo.from_prim_func(func)
        result = runner.run([ms.runner.RunnerInput(b.artifact_path, "cpu", args)])[0].result()
        if result.error_msg:
            report.skipped[name] = "does not run on random inputs: " + _first_error_line(result.error_msg)
            continue
        db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, result.run_secs, target, args))
        report.before_ms[name] = round(_mean(result.run_secs) * 1e3, 6)


def build_candidate(mod, target, _params):
    """MetaSchedule's default build without its `import tvm.s_tir.tensor_intrin`, which takes 23 s
    on this machine in every fresh builder process (float32 llvm schedules tensorize nothing)."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _progress_callback(bar, names, report: TuneReport):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            report.trials += len(runner_results)
            bar.set_postfix_str(names[task_id][:40])
            bar.update(min(len(runner_results), bar.total - bar.n))

    return Progress()


def _first_error_line(msg: str) -> str:
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    return (lines[-1] if lines else "unknown error")[:200]


def _mean(secs) -> float:
    vals = [float(s) for s in secs]
    return sum(vals) / len(vals)
