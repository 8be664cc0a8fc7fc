"""MetaSchedule tuning: which kernels are tasks, the database compile reads, and its atomic swap."""
import json
import pathlib

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed")
pytestmark = pytest.mark.tvm

from lstm_export import LSTM, UserError  # noqa: E402
from lstm_export.export import export_onnx  # noqa: E402
from lstm_export.runtimes.ort import OrtCpuRuntime  # noqa: E402
from lstm_export.runtimes.tvm_runtime import TvmLlvmRuntime  # noqa: E402


def _export(tmp_path, mode, T=2, B=2, I=3, H=4, name=None):
    import torch
    torch.manual_seed(0)
    kw = {"seq_len": T, "batch_size": B} if mode == "unrolled" else {}
    return export_onnx(LSTM(I, H).eval(), tmp_path / (name or f"{mode}.onnx"), mode, **kw)


def _tunable(path):
    from lstm_export.runtimes.model_io import load_onnx
    from lstm_export.runtimes.tvm_lstm.pipeline.compile import host_target, import_onnx, legalize_cpu
    from lstm_export.runtimes.tvm_lstm.pipeline.tuning import tunable
    return tunable(legalize_cpu(import_onnx(load_onnx(path)), host_target()))


def _tasks(path):
    return [name for name, _ in _tunable(path)]


def test_tasks_are_static_generic_kernels_only(tmp_path):
    from lstm_export.runtimes.tvm_lstm.pipeline.tuning import MAX_PARAMS
    assert _tasks(_export(tmp_path, "native")) == []  # our lstm_ kernel, and dynamic T and B: nothing to tune
    short = _tasks(_export(tmp_path, "unrolled", T=2))
    assert any("matmul" in n for n in short) and any(n.startswith("split") for n in short)
    assert not any(n.startswith("lstm_") for n in short)
    long = _tasks(_export(tmp_path, "unrolled", T=MAX_PARAMS + 2, name="long.onnx"))
    assert any("matmul" in n for n in long)
    assert not any(n == "split" or n == "concatenate" for n in long)  # T+1 buffers: left to the default


def _run(art, feeds):
    rt = TvmLlvmRuntime()
    rt.prepare(art)
    out = rt.run(feeds)
    rt.release()
    return out


@pytest.mark.slow
def test_tune_then_compile_from_the_database(tmp_path):
    from lstm_export.runtimes.tvm_lstm.pipeline.compile import compile_onnx
    from lstm_export.runtimes.tvm_lstm.pipeline.tuning import open_database
    path = _export(tmp_path, "unrolled", T=3, B=2)
    db_dir = tmp_path / "db"
    compile_onnx(path, tmp_path / "tuned", tuning_db=db_dir, tune_trials=1, progress=False)
    meta = json.loads((tmp_path / "tuned" / "meta.json").read_text())
    tasks = meta["tuning"]["tasks"]
    assert tasks and meta["tuning"]["trials"] >= 1
    assert set(meta["tuning"]["before_ms"]) == set(tasks)  # every kernel measured untuned first
    assert all(meta["tuning"]["best_ms"][t] <= meta["tuning"]["before_ms"][t] for t in tasks)
    assert meta["kernels_from_db"] == len(tasks) and meta["tuning_db"] == str(db_dir)

    # the database alone: every kernel has a valid best record, and compile picks them up without tuning
    db = open_database(db_dir)
    assert db is not None and len(db.get_all_tuning_records()) == len(tasks)  # pruned: the best per kernel
    compile_onnx(path, tmp_path / "again", tuning_db=db_dir)
    again = json.loads((tmp_path / "again" / "meta.json").read_text())
    assert again["kernels_from_db"] == len(tasks) and "tuning" not in again
    compile_onnx(path, tmp_path / "plain", tuning_db="none")
    assert json.loads((tmp_path / "plain" / "meta.json").read_text())["kernels_from_db"] == 0

    feeds = {"input": np.random.default_rng(1).standard_normal((3, 2, 3)).astype(np.float32)}
    ort = OrtCpuRuntime()
    ort.prepare(path)
    want = ort.run(feeds)
    for art in ("tuned", "again", "plain"):
        got = _run(tmp_path / art, feeds)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-5, err_msg=f"{art}: {k}")


def _one_record_database(tmp_path, db_dir):
    """A database holding one record (the plain loop nest of the first task) without a tuning run:
    what the swap does to the files does not depend on how the record was measured."""
    from tvm.s_tir import meta_schedule as ms

    from lstm_export.runtimes.tvm_lstm.pipeline.compile import host_target
    from lstm_export.runtimes.tvm_lstm.pipeline.tuning import open_database, plain_schedule, task_module
    _, func = _tunable(_export(tmp_path, "unrolled", T=2))[0]
    db = open_database(db_dir, create=True)
    mod = task_module(func)
    db.commit_tuning_record(ms.database.TuningRecord(plain_schedule(mod).trace, db.commit_workload(mod), [1e-3],
                                                     host_target(), ms.arg_info.ArgInfo.from_prim_func(func)))


def test_an_interrupted_swap_keeps_the_old_database(tmp_path, monkeypatch):
    from lstm_export.runtimes.tvm_lstm.pipeline import tuning
    db_dir = tmp_path / "db"
    _one_record_database(tmp_path, db_dir)
    assert len(tuning.open_database(db_dir).get_all_tuning_records()) == 1
    before = {f: (db_dir / f).read_bytes() for f in tuning._DB_FILES}

    real_rename, calls = pathlib.Path.rename, []

    def dies_on_second_rename(self, target):
        calls.append(self)
        if len(calls) == 2:  # DIR is already DIR.old; DIR.new never becomes DIR
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", dies_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        tuning._replace_database(tuning.open_database(db_dir), db_dir)
    monkeypatch.setattr(pathlib.Path, "rename", real_rename)
    assert not db_dir.exists()
    assert tuning.open_database(db_dir) is not None  # recovered from DIR.old
    assert {f: (db_dir / f).read_bytes() for f in tuning._DB_FILES} == before


def test_bad_tuning_arguments_say_what_to_do(cli_here, tmp_path):
    path = _export(tmp_path, "unrolled")
    r = cli_here("compile", path, "--out", tmp_path / "o", "--tuning-db", tmp_path / "nowhere")
    assert r.returncode != 0 and "holds no MetaSchedule database" in r.stderr and "--tune" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli_here("compile", path, "--out", tmp_path / "o", "--tune", "--trials", "0")
    assert r.returncode == 2 and "argument --trials: must be an integer at least 1, got 0" in r.stderr
    r = cli_here("compile", path, "--out", tmp_path / "o", "--target", "cuda", "--tune")
    assert r.returncode != 0 and "--tune works with llvm targets only" in r.stderr
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for f in ("database_workload.json", "database_tuning_record.json"):
        (garbage / f).write_text("not json\n")
    r = cli_here("compile", path, "--out", tmp_path / "o", "--tuning-db", garbage)
    assert r.returncode == 2 and "is not a readable MetaSchedule database" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_committed_database_serves_the_benchmark_shapes(tmp_path):
    """The committed database for this CPU, when there is one, is valid and used by a plain compile."""
    from lstm_export.harness.bench import DEFAULT_SHAPES
    from lstm_export.runtimes.tvm_lstm.pipeline.compile import compile_onnx, host_target
    from lstm_export.runtimes.tvm_lstm.pipeline.tuning import default_db_dir, open_database
    d = default_db_dir(host_target())
    db = open_database(d)
    if db is None:
        pytest.skip(f"no committed tuning database for this CPU ({d.name})")
    records = db.get_all_tuning_records()
    assert records and all(str(r.target.kind.name) == "llvm" for r in records)
    s = DEFAULT_SHAPES[0]
    path = _export(tmp_path, "unrolled", T=s.T, B=s.B, I=s.I, H=s.H)
    compile_onnx(path, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["tuning_db"] == str(d) and meta["kernels_from_db"] == len(_tasks(path)) > 0


def test_tuning_is_for_llvm_only(tmp_path):
    from lstm_export.runtimes.tvm_lstm.pipeline.compile import compile_onnx
    with pytest.raises(UserError, match="--tune works with llvm targets only"):
        compile_onnx(_export(tmp_path, "native"), tmp_path / "o", target="cuda", tune_trials=2)
