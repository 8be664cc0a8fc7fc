"""compare: a runtime that fails to load or run is a row of the report, named, and the rest go on.
Oracle: ONNX Runtime as the reference on the same model."""
import numpy as np
import pytest
from onnx import TensorProto, helper

from lstm_export.common.errors import UserError
from lstm_export.harness.compare import compare
from lstm_export.runtimes.base import Availability, Runtime, RuntimeFailure
from lstm_export.runtimes.ort import OrtCpuRuntime


def _det(path):
    """Batched determinants: ORT and the reference evaluator run Det; TVM 0.27 has no converter."""
    node = helper.make_node("Det", ["X"], ["Y"], name="det0")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [5, 3, 3])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [5])])
    import onnx
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


class _Broken(OrtCpuRuntime):
    """ORT, except that its backend raises a raw exception mid-run (as a crashed device would)."""
    name = "broken"

    def _run(self, feeds):
        raise ValueError("device lost\nsecond line")


def test_a_runtime_that_raises_is_a_named_row_and_the_others_go_on(tmp_path):
    path = _det(tmp_path / "det.onnx")
    feeds = {"X": np.random.default_rng(1).standard_normal((5, 3, 3)).astype(np.float32)}
    report = compare(path, ["ort-cpu", _Broken(), "onnx-reference"], feeds)
    rows = {r.runtime: r for r in report.results}
    assert rows["broken"].error == "broken failed to run: ValueError: device lost" and not report.passed
    assert rows["onnx-reference"].passed  # reached after the failure
    with pytest.raises(RuntimeFailure, match="^broken failed to run: ValueError"):
        rt = _Broken()
        rt.prepare(path)
        rt.run(feeds)


def test_tvm_that_cannot_import_a_model_is_a_row(tmp_path):
    pytest.importorskip("tvm")
    path = _det(tmp_path / "det.onnx")
    feeds = {"X": np.random.default_rng(1).standard_normal((5, 3, 3)).astype(np.float32)}
    report = compare(path, ["ort-cpu", "tvm-llvm", "onnx-reference"], feeds)
    rows = {r.runtime: r for r in report.results}
    assert "Det" in rows["tvm-llvm"].error and rows["tvm-llvm"].error.count("\n") == 0
    assert rows["onnx-reference"].passed


def test_the_reference_failing_is_an_error_not_a_report(tmp_path):
    path = _det(tmp_path / "det.onnx")
    with pytest.raises(UserError, match="broken failed to run"):
        compare(path, [_Broken(), "ort-cpu"], {"X": np.zeros((5, 3, 3), np.float32)})


class _Unprepared(Runtime):
    name = "plain"

    @classmethod
    def availability(cls):
        return Availability(True)

    def _prepare(self, source):
        self.names = source.output_names

    def _run(self, feeds):
        return {n: np.zeros(1) for n in self.names}


def test_the_contract_checks_feeds_before_any_backend_runs(tmp_path):
    rt = _Unprepared()
    with pytest.raises(UserError, match="call prepare"):
        rt.run({})
    rt.prepare(_det(tmp_path / "det.onnx"))
    for feeds, needle in [({}, "inputs missing: X"), ({"X": np.zeros((5, 3, 3))}, "dtype float64"),
                          ({"X": np.full((5, 3, 3), np.inf, np.float32)}, "0 NaN and 45 Inf")]:
        with pytest.raises(UserError, match=needle):
            rt.run(feeds)
    rt.allow_nonfinite = True
    assert set(rt.run({"X": np.full((5, 3, 3), np.inf, np.float32)})) == {"Y"}


class _Bf16Like(OrtCpuRuntime):
    """ORT's answer moved by a bf16-sized error, calling itself `precision`."""
    name = "bf16-like"

    def __init__(self, precision):
        super().__init__()
        self.precision = precision

    def _run(self, feeds):
        return {k: v + 4e-3 for k, v in super()._run(feeds).items()}


def test_each_runtime_is_held_to_its_own_precision(tmp_path):
    """A bf16 runtime passes within bf16's tolerance where an fp32 one with the same error fails;
    an explicit per-output tolerance still wins; the table names each runtime's precision."""
    path = _det(tmp_path / "det.onnx")
    feeds = {"X": np.random.default_rng(0).standard_normal((5, 3, 3)).astype(np.float32)}
    report = compare(path, ["ort-cpu", _Bf16Like("bf16"), _Bf16Like("fp32")], feeds)
    bf16, fp32 = report.results
    assert bf16.precision == "bf16" and bf16.passed and bf16.outputs[0].atol == 8 * 2.0 ** -8
    assert fp32.precision == "fp32" and not fp32.passed
    assert "bf16-like         bf16" in report.table()
    tight = compare(path, ["ort-cpu", _Bf16Like("bf16")], feeds, tolerances={"Y": (1e-5, 0.0)})
    assert not tight.passed
