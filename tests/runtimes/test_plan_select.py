"""Measured plan selection (lstm_export/runtimes/tvm_lstm/pipeline/plan_select.py): compile times candidate kernel
plans on this machine, keeps the fastest, records it in meta.json and caches the choice."""
import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed")

from lstm_export import LSTM  # noqa: E402
from lstm_export.export import export_onnx  # noqa: E402
from lstm_export.runtimes.tvm_lstm.kernels.cpu_plan import ALL, NONE, layer_plan, plan_for  # noqa: E402
from lstm_export.runtimes.tvm_lstm.kernels.recurrence import CellSpec  # noqa: E402
from lstm_export.runtimes.tvm_lstm.pipeline import plan_select  # noqa: E402
from lstm_export.runtimes.tvm_lstm.pipeline.compile import compile_onnx, parse_target  # noqa: E402

TIMED_AT = (5, 8, 6)  # (T, B, I): B >= any register tile, so the tiles' plans are what runs


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    return export_onnx(LSTM(6, 20, 1).eval(), d / "n.onnx", "native")


def _ort(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})


def test_layer_plan_turns_thresholds_into_this_layers_decisions():
    """Packed W and R of a 20-unit LSTM on 6 inputs take 4 * 4 blocks-worth of floats per row
    (packing pads units to whole blocks): a batch-split threshold above that size decides 'batch
    split', below it 'step split', and plans that decide alike become one plan."""
    from lstm_export.runtimes.tvm_lstm.kernels import packing
    base = plan_for(parse_target("llvm", None, "sm_90"))
    spec = CellSpec(20, ("Sigmoid", None, None), ("Tanh", None, None), ("Tanh", None, None))
    w = packing.pack_gates(np.zeros((80, 6), np.float32), 20, base.lanes)
    r = packing.pack_gates(np.zeros((80, 20), np.float32), 20, base.lanes)
    nbytes = (w.size + r.size) * 4  # the layer's packed weights, from the packing itself
    above = layer_plan(spec, 6, dataclasses.replace(base, batch_split_bytes=nbytes))
    below = layer_plan(spec, 6, dataclasses.replace(base, batch_split_bytes=nbytes - 1))
    assert above.batch_split_bytes == ALL and below.batch_split_bytes == NONE
    assert layer_plan(spec, 6, dataclasses.replace(base, batch_split_bytes=nbytes * 2)) == above
    assert above.mr == base.mr and above.lanes == base.lanes


def test_the_derived_plan_stays_unless_another_is_clearly_faster():
    """3% faster than derived is noise and keeps derived; the margin or more wins."""
    margin = plan_select.MARGIN
    assert plan_select.pick({"derived": 1.0, "a": 1.0 - margin / 2, "b": 1.2}) == "derived"
    assert plan_select.pick({"derived": 1.0, "a": 1.0 - margin, "b": 1.0 - 2 * margin}) == "b"
    assert plan_select.pick({"derived": 1.0}) == "derived"


@pytest.mark.slow
def test_compile_measures_plans_caches_the_choice_and_the_artifact_is_right(monkeypatch, small, tmp_path):
    """Real timings: every candidate built or skipped with a reason, the derived plan timed, the
    choice in meta.json; the second compile takes it from the plan cache; both artifacts agree
    with ONNX Runtime."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    first = compile_onnx(small, tmp_path / "a", target="llvm", plan_budget_s=60, input_shapes={"input": TIMED_AT},
                         progress=False)
    choice = first.meta.plan_selection
    assert choice["source"] == "measured" and choice["timed_at"] == {"input": list(TIMED_AT)}
    names = [c["name"] for c in choice["candidates"]]
    assert names == [n for n, _ in plan_select.candidates(plan_for(parse_target("llvm", None, "sm_90")))]
    timed = {c["name"]: c["ms"] for c in choice["candidates"] if "ms" in c}
    assert "derived" in timed and len(timed) >= 2 and all(ms > 0 for ms in timed.values())
    assert all("skipped" in c for c in choice["candidates"] if "ms" not in c)
    assert choice["chosen"] == plan_select.pick({n: ms for n, ms in timed.items()})
    assert first.meta.kernel_plan == next(c["plan"] for c in choice["candidates"] if c["name"] == choice["chosen"])
    assert len(list((tmp_path / "xdg" / "lstm-export" / "plans").glob("*.json"))) == 1

    again = compile_onnx(small, tmp_path / "b", target="llvm", plan_budget_s=60, input_shapes={"input": TIMED_AT},
                         progress=False)
    assert again.meta.plan_selection["source"] == "cache"
    assert again.meta.plan_selection["chosen"] == choice["chosen"]
    assert again.meta.kernel_plan == first.meta.kernel_plan
    from lstm_export.runtimes.tvm_runtime import TvmLlvmRuntime
    x = np.random.default_rng(1).standard_normal(TIMED_AT).astype(np.float32)
    for folder in (tmp_path / "a", tmp_path / "b"):
        rt = TvmLlvmRuntime()
        rt.prepare(folder)
        for got, want in zip(rt.run({"input": x}).values(), _ort(small, x)):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_small_budget_times_the_derived_plan_only(monkeypatch, small, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = compile_onnx(small, tmp_path / "o", target="llvm", plan_budget_s=0.001, input_shapes={"input": TIMED_AT},
                       progress=False)
    cands = out.meta.plan_selection["candidates"]
    assert [c["name"] for c in cands if "ms" in c] == ["derived"]
    assert {c.get("skipped") for c in cands[1:]} <= {"over the budget"}
    assert out.meta.plan_selection["chosen"] == "derived"


def test_cross_compiles_and_budget_zero_take_the_derived_plan(small, tmp_path):
    avx2 = compile_onnx(small, tmp_path / "x", target="llvm -mcpu=haswell", plan_budget_s=10, progress=False)
    assert avx2.meta.plan_selection["source"] == "derived"
    assert "not this machine" in avx2.meta.plan_selection["why"]
    zero = compile_onnx(small, tmp_path / "z", target="llvm", plan_budget_s=0, progress=False)
    assert zero.meta.plan_selection == dict(zero.meta.plan_selection, source="derived", chosen="derived")
    derived = plan_for(parse_target("llvm", None, "sm_90"))
    assert zero.meta.kernel_plan["batch_split_bytes"] == derived.batch_split_bytes


def test_the_plan_budget_on_the_command_line(cli, small, tmp_path):
    bad = cli("compile", small, "--out", tmp_path / "bad", "--plan-budget-s", "-1")
    assert bad.returncode == 2 and "--plan-budget-s" in bad.stderr and "Traceback" not in bad.stderr
    ok = cli("compile", small, "--out", tmp_path / "ok", "--plan-budget-s", "0")
    assert ok.returncode == 0, ok.stderr
    assert "kernel plan derived from the target (--plan-budget-s 0)" in ok.stdout
    assert json.loads((tmp_path / "ok" / "meta.json").read_text())["plan_selection"]["source"] == "derived"


def test_a_measured_artifact_loads_without_tvm_noise(small, tmp_path):
    """The exported winner is built afresh: an executable the timing VM had run exported with that
    VM's state, and each load of its model.so printed TVM's "Scope Loaded" warnings."""
    import subprocess
    import sys
    compile_onnx(small, tmp_path / "out", plan_budget_s=2)
    code = ("import numpy as np; from lstm_export.runtimes.tvm_runtime import TvmLlvmRuntime; rt = TvmLlvmRuntime(); "
            f"rt.prepare({str(tmp_path / 'out')!r}); rt.run({{'input': np.zeros((3, 2, 6), np.float32)}}); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-500:]
    assert "Scope" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-500:]
