"""Models exported by torch.onnx (TorchScript exporter) with padding computed from the input's
shape compile through TVM after simplification. Oracle: ONNX Runtime on the unsimplified model."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tvm")

from lstm_export.runtimes.base import get_runtime  # noqa: E402
from lstm_export.runtimes.tvm_lstm.frontend.simplify import simplify  # noqa: E402

pytestmark = pytest.mark.tvm


class ConvLSTM(torch.nn.Module):
    """A speech-style front end: pad the length to a multiple of 4 (computed from x.shape), conv, LSTM."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(3, 8, 3)
        self.lstm = torch.nn.LSTM(8, 16, batch_first=True)

    def forward(self, x):  # (B, 3, L)
        x = F.pad(x, (0, (4 - x.shape[-1] % 4) % 4))
        return self.lstm(self.conv(x).transpose(1, 2))[0]


def _export(path, dynamic):
    torch.manual_seed(0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on LSTM batch sizes
        torch.onnx.export(ConvLSTM().eval(), (torch.randn(2, 3, 10),), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": dynamic, "y": {0: "batch"}}, dynamo=False, opset_version=17)
    return path


def _ort(path, x):
    with get_runtime("ort-cpu") as rt:
        rt.prepare(path)
        return rt.run({"x": x})["y"]


def test_padding_from_a_static_dim_folds_and_the_batch_stays_symbolic(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = _export(tmp_path / "m.onnx", {0: "batch"})
    ops = {n.op_type for n in simplify(onnx.load(path)).graph.node}
    assert "Pad" not in ops and "Mod" not in ops  # the shape arithmetic is gone
    with get_runtime("tvm-llvm") as rt:
        rt.prepare(path)
        for batch in (1, 3):  # one artifact, any batch
            x = np.random.default_rng(batch).standard_normal((batch, 3, 10)).astype(np.float32)
            np.testing.assert_allclose(rt.run({"x": x})["y"], _ort(path, x), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_padding_from_a_symbolic_dim_needs_it_fixed(cli_here, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = _export(tmp_path / "m.onnx", {0: "batch", 2: "length"})
    r = cli_here("compile", path, "--out", tmp_path / "plain")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and r.stdout == "", (r.stdout, r.stderr)
    assert "TVM cannot import Pad node '/Pad'" in r.stderr and "Dynamic pads" in r.stderr
    assert "--input-shape x=<batch>x3x<length>" in r.stderr
    r = cli_here("compile", path, "--out", tmp_path / "fixed", "--dim", "length=10")
    assert r.returncode == 0, r.stderr
    x = np.random.default_rng(0).standard_normal((2, 3, 10)).astype(np.float32)
    with get_runtime("tvm-llvm") as rt:
        rt.prepare(tmp_path / "fixed")
        np.testing.assert_allclose(rt.run({"x": x})["y"], _ort(path, x), rtol=1e-3, atol=1e-4)


def _vad_like(path):
    """A graph that picks its branch by a scalar sample-rate input, as voice-activity detectors do;
    each branch pads its input to a multiple of k computed from x.shape (k = 4 or 3)."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, v):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.int64), name))

    def branch(k, p):
        nodes = [helper.make_node("Shape", ["x"], [p + "s"]), const(p + "i", 2),
                 helper.make_node("Gather", [p + "s", p + "i"], [p + "L"], axis=0), const(p + "k", k),
                 helper.make_node("Mod", [p + "L", p + "k"], [p + "m"]),
                 helper.make_node("Sub", [p + "k", p + "m"], [p + "d"]),
                 helper.make_node("Mod", [p + "d", p + "k"], [p + "p"]), const(p + "z", [0] * 5), const(p + "a0", [0]),
                 helper.make_node("Unsqueeze", [p + "p", p + "a0"], [p + "pu"]),
                 helper.make_node("Concat", [p + "z", p + "pu"], [p + "pads"], axis=0),
                 helper.make_node("Pad", ["x", p + "pads"], [p + "xp"]), const(p + "a2", [2]),
                 helper.make_node("ReduceSum", [p + "xp", p + "a2"], [p + "y"], keepdims=0),
                 helper.make_node("Shape", [p + "xp"], [p + "s2"]),
                 helper.make_node("Gather", [p + "s2", p + "i"], [p + "L2"], axis=0),
                 helper.make_node("Cast", [p + "L2"], [p + "L2f"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", [p + "y", p + "L2f"], [p + "out"])]
        return helper.make_graph(nodes, p, [], [helper.make_tensor_value_info(p + "out", TensorProto.FLOAT,
                                                                              ["batch", 3])])

    nodes = [const("sr16k", 16000), helper.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["y"], then_branch=branch(4, "a"), else_branch=branch(3, "b"))]
    g = helper.make_graph(nodes, "vad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 10]),
                                         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def test_shape_arithmetic_inside_if_branches_folds_and_a_scalar_input_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = _vad_like(tmp_path / "vad.onnx")
    branches = [a.g for n in simplify(onnx.load(path)).graph.node if n.op_type == "If" for a in n.attribute]
    assert all(n.op_type not in ("Shape", "Mod") for b in branches for n in b.node)
    x = np.random.default_rng(0).standard_normal((2, 3, 10)).astype(np.float32)
    with get_runtime("tvm-llvm") as rt, get_runtime("ort-cpu") as oracle:
        rt.prepare(path)
        oracle.prepare(path)
        for sr in (16000, 8000):  # a 0-d input: it had been turned 1-d on its way into the VM
            feeds = {"x": x, "sr": np.array(sr, np.int64)}
            np.testing.assert_allclose(rt.run(feeds)["y"], oracle.run(feeds)["y"], rtol=1e-5, atol=1e-4)


class ConvGRU(ConvLSTM):
    """The same front end before a GRU (the dynamo exporter writes GRU with linear_before_reset=1)."""

    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.GRU(8, 16, batch_first=True)


@pytest.mark.slow
@pytest.mark.parametrize("net", [ConvLSTM, ConvGRU])
def test_the_dynamo_exporter_s_models_compile_and_match(tmp_path, net):
    """torch.onnx.export(dynamo=True) writes its own shape chain (Shape/Slice/Concat/Expand for the
    initial state); the batch stays symbolic."""
    import logging
    import warnings
    torch.manual_seed(0)
    logging.disable(logging.WARNING)  # the exporter's progress lines
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(net().eval(), (torch.randn(2, 3, 10),), dynamo=True, input_names=["x"],
                                        output_names=["y"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    finally:
        logging.disable(logging.NOTSET)
    path = tmp_path / "m.onnx"
    program.save(str(path))
    assert {"Shape", "GRU" if net is ConvGRU else "LSTM"} <= {n.op_type for n in onnx.load(path).graph.node}
    with get_runtime("tvm-llvm", cache=False) as rt:
        rt.prepare(path)
        for batch in (1, 3):
            x = np.random.default_rng(batch).standard_normal((batch, 3, 10)).astype(np.float32)
            np.testing.assert_allclose(rt.run({"x": x})["y"], _ort(path, x), rtol=1e-3, atol=1e-4)
