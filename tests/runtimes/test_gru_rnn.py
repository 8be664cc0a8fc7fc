"""ONNX GRU and RNN on tvm-llvm against ONNX Runtime over the spec's attributes, and ONNX's own
test_gru_* / test_rnn_* conformance cases."""
import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm")

from runtimes.tvm_runtime import TvmLlvmRuntime  # noqa: E402

from ..marks import one_fast  # noqa: E402

pytestmark = pytest.mark.tvm
H, I = 5, 3
GATES = {"GRU": 3, "RNN": 1}


def rnn_model(op, D=1, layout=0, optional=("B", "sequence_lens", "initial_h"), outputs=("Y", "Y_h"), opset=14,
              seed=0, **attrs):
    g_ = GATES[op]
    rng = np.random.default_rng(seed)
    inits = {"W": rng.standard_normal((D, g_ * H, I)) * 0.5, "R": rng.standard_normal((D, g_ * H, H)) * 0.5,
             "B": rng.standard_normal((D, 2 * g_ * H)) * 0.3}
    t_, b_ = ("time", "batch") if layout == 0 else ("batch", "time")
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [t_, b_, I])]
    if "sequence_lens" in optional:
        inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["batch"]))
    if "initial_h" in optional:
        inputs.append(helper.make_tensor_value_info("initial_h", TensorProto.FLOAT,
                                                    [D, "batch", H] if layout == 0 else ["batch", D, H]))
    node_inputs = [n if n in ("X", "W", "R") or n in optional else "" for n in
                   ("X", "W", "R", "B", "sequence_lens", "initial_h")]
    while node_inputs[-1] == "":
        node_inputs.pop()
    node_outputs = [o if o in outputs else "" for o in ("Y", "Y_h")]
    while node_outputs[-1] == "":
        node_outputs.pop()
    if opset >= 14:
        attrs["layout"] = layout
    node = helper.make_node(op, node_inputs, node_outputs, name="the_rnn", hidden_size=H, **attrs)
    g = helper.make_graph([node], "rnn", inputs,
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * (4 if o == "Y" else 3))
                           for o in outputs],
                          [numpy_helper.from_array(inits[k].astype(np.float32), k) for k in ("W", "R", "B")
                           if k in ("W", "R") or k in optional])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _feeds(model, T, B, seed):
    rng = np.random.default_rng(seed)
    node = model.graph.node[0]
    layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
    D = 2 if any(a.name == "direction" and a.s == b"bidirectional" for a in node.attribute) else 1
    feeds = {"X": rng.standard_normal((T, B, I) if layout == 0 else (B, T, I)).astype(np.float32)}
    names = {vi.name for vi in model.graph.input}
    if "sequence_lens" in names:
        feeds["sequence_lens"] = rng.integers(1, T + 1, B).astype(np.int32)
    if "initial_h" in names:
        feeds["initial_h"] = rng.standard_normal((D, B, H) if layout == 0 else (B, D, H)).astype(np.float32)
    return feeds


def _ort(model, feeds):
    """ONNX Runtime's outputs; layout 1 (which ORT refuses) as layout 0 on transposed data."""
    node = model.graph.node[0]
    if next((a.i for a in node.attribute if a.name == "layout"), 0) == 0:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    m0 = onnx.ModelProto()
    m0.CopyFrom(model)
    next(a for a in m0.graph.node[0].attribute if a.name == "layout").i = 0
    for vi in m0.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 3:
            a, b = dims[0].SerializeToString(), dims[1].SerializeToString()
            dims[0].ParseFromString(b)
            dims[1].ParseFromString(a)
    f0 = {k: (v.transpose(1, 0, 2) if v.ndim == 3 else v) for k, v in feeds.items()}
    outs = ort.InferenceSession(m0.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, f0)
    names = [o.name for o in model.graph.output]
    return [o.transpose(2, 0, 1, 3) if n == "Y" else o.transpose(1, 0, 2) for n, o in zip(names, outs)]


def check(model, tmp_path, shapes=((5, 3), (8, 2))):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rt = TvmLlvmRuntime(cache=False)
    rt.prepare(path)
    for k, (T, B) in enumerate(shapes):
        feeds = _feeds(model, T, B, seed=k)
        got = rt.run(feeds)
        for name, want in zip([o.name for o in model.graph.output], _ort(model, feeds)):
            np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5, err_msg=f"{name} T={T} B={B}")
    rt.release()


GRID = list(itertools.product(["GRU", "RNN"], ["bidirectional", "forward", "reverse"], [1, 0],
                              [("B", "sequence_lens", "initial_h"), ()]))


@pytest.mark.parametrize("op,direction,layout,optional", one_fast([g for g in GRID if g[0] == "GRU"], multi=True)
                         + one_fast([g for g in GRID if g[0] == "RNN"], multi=True))
def test_directions_layouts_and_optional_inputs(tmp_path, op, direction, layout, optional):
    D = 2 if direction == "bidirectional" else 1
    check(rnn_model(op, D, layout, optional, direction=direction), tmp_path)


@pytest.mark.parametrize("lbr", [1, 0])
def test_gru_linear_before_reset_both_ways(tmp_path, lbr):
    check(rnn_model("GRU", 2, 0, direction="bidirectional", linear_before_reset=lbr), tmp_path)


ACTS = {"GRU": [{"activations": ["HardSigmoid", "Softsign"] * 2, "activation_alpha": [0.3, 0.4],
                 "activation_beta": [0.6, 0.5], "clip": 0.9},
                {"activations": ["Sigmoid", "Affine", "LeakyRelu", "Tanh"], "activation_alpha": [0.7, 0.1],
                 "activation_beta": [0.2]}],
        "RNN": [{"activations": ["Relu", "ScaledTanh"], "activation_alpha": [1.3], "activation_beta": [0.7]},
                {"activations": ["Elu", "Softplus"], "clip": 0.5}]}


@pytest.mark.parametrize("op,attrs", one_fast([(op, a) for op in ACTS for a in ACTS[op]], multi=True))
def test_activations_alpha_beta_and_clip(tmp_path, op, attrs):
    check(rnn_model(op, 2, 0, direction="bidirectional", **attrs), tmp_path)


@pytest.mark.parametrize("op,outputs,opset", one_fast([("GRU", ("Y_h",), 7), ("RNN", ("Y",), 7), ("GRU", ("Y",), 14),
                                                       ("RNN", ("Y_h",), 22)], multi=True))
def test_any_subset_of_outputs_and_every_opset(tmp_path, op, outputs, opset):
    check(rnn_model(op, 1, 0, ("B", "initial_h"), outputs=outputs, opset=opset), tmp_path)


def _conformance_cases():
    """ONNX's own GRU and RNN node tests, generated by the onnx package (its wheel ships the
    generators, not the data files)."""
    import warnings

    from onnx.backend.test.case import node
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # other ops' generators divide by zero on purpose
        cases = node.collect_testcases("")
    return [c for c in cases if c.name.startswith(("test_gru", "test_rnn", "test_simple_rnn"))]


CONFORMANCE = _conformance_cases()


@pytest.mark.parametrize("case", one_fast(CONFORMANCE), ids=[c.name for c in CONFORMANCE])
def test_onnx_conformance(tmp_path, case):
    assert len(CONFORMANCE) == 12  # 6 GRU, 6 RNN: a changed onnx release is noticed
    path = tmp_path / "m.onnx"
    onnx.save(case.model, path)
    rt = TvmLlvmRuntime(cache=False)
    rt.prepare(path)
    for inputs, outputs in case.data_sets:
        got = rt.run({vi.name: np.asarray(x) for vi, x in zip(case.model.graph.input, inputs)})
        for vi, want in zip(case.model.graph.output, outputs):
            np.testing.assert_allclose(got[vi.name], want, rtol=1e-3, atol=1e-5, err_msg=f"{case.name} {vi.name}")


@pytest.mark.slow
def test_a_torch_exported_bidirectional_gru_ocr_head(tmp_path):
    """An OCR-style head as torch.onnx.export writes it (GRU with linear_before_reset=1, Slice
    and Concat around it), on one artifact for any batch and width."""
    import warnings

    import torch

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(8, 12, num_layers=2, bidirectional=True, batch_first=True)
            self.fc = torch.nn.Linear(24, 30)

        def forward(self, x):  # (B, W, 8) column features
            return self.fc(self.gru(x)[0]).log_softmax(-1)

    torch.manual_seed(0)
    path = tmp_path / "ocr.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Head().eval(), (torch.randn(2, 7, 8),), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 1: "width"}, "y": {0: "batch", 1: "width"}},
                          dynamo=False, opset_version=17)
    assert {n.op_type for n in onnx.load(path).graph.node} >= {"GRU"}
    rt = TvmLlvmRuntime(cache=False)
    rt.prepare(path)
    for shape in ((1, 9, 8), (3, 5, 8)):
        x = np.random.default_rng(shape[0]).standard_normal(shape).astype(np.float32)
        want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(rt.run({"x": x})["y"], want, rtol=1e-3, atol=1e-4)


def _to_float16(model):
    """The model with float16 weights, inputs and outputs (as a float16 export would be)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(a.astype(np.float16), init.name))
    for vi in [*m.graph.input, *m.graph.output]:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return m


@pytest.mark.parametrize("op", one_fast(["RNN", "LSTM", "GRU"]))
def test_float16_models_compute_in_float32_as_ort_does(tmp_path, op):
    from .lstm_cases import lstm_model
    model = _to_float16(lstm_model(2, 0, direction="bidirectional") if op == "LSTM" else
                        rnn_model(op, 2, 0, direction="bidirectional"))
    path = tmp_path / "m16.onnx"
    onnx.save(model, path)
    rt = TvmLlvmRuntime(cache=False)
    rt.prepare(path)
    rng = np.random.default_rng(0)
    feeds = {vi.name: (rng.integers(1, 6, 3).astype(np.int32) if vi.name == "sequence_lens" else
                       rng.standard_normal((5, 3, 3) if vi.name == "X" else (2, 3, 4 if op == "LSTM" else H))
                       .astype(np.float16)) for vi in model.graph.input}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = rt.run(feeds)
    for vi, w in zip(model.graph.output, want):
        assert got[vi.name].dtype == np.float16
        np.testing.assert_allclose(got[vi.name].astype(np.float32), w.astype(np.float32), rtol=1e-3, atol=1e-3,
                                   err_msg=vi.name)
