"""One-node ONNX LSTM models over the whole spec, their feeds, and ONNX Runtime as their oracle."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lstm_export.runtimes.tvm_runtime import TvmLlvmRuntime

H, I = 4, 3
INPUTS = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]


def lstm_model(
    D=1,
    layout=0,
    optional=("B", "sequence_lens", "initial_h", "initial_c", "P"),
    outputs=("Y", "Y_h", "Y_c"),
    opset=14,
    seed=0,
    computed_weights=False,
    hidden=H,
    **attrs,
):
    """A one-node ONNX LSTM with symbolic time and batch; weights are initializers, or (computed_weights)
    come out of an Add node, so the converter cannot pack them at import time."""
    H = hidden  # noqa: N806
    rng = np.random.default_rng(seed)
    inits = {"W": rng.standard_normal((D, 4 * H, I)) * 0.5, "R": rng.standard_normal((D, 4 * H, H)) * 0.5,
             "B": rng.standard_normal((D, 8 * H)) * 0.3, "P": rng.standard_normal((D, 3 * H)) * 0.3}
    T_, B_ = ("time", "batch") if layout == 0 else ("batch", "time")
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [T_, B_, I])]
    node_inputs = []
    for name in INPUTS:
        if name in ("X", "W", "R") or name in optional:
            node_inputs.append(name)
        else:
            node_inputs.append("")
    if "sequence_lens" in optional:
        graph_inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["batch"]))
    state = [D, "batch", H] if layout == 0 else ["batch", D, H]
    for s in ("initial_h", "initial_c"):
        if s in optional:
            graph_inputs.append(helper.make_tensor_value_info(s, TensorProto.FLOAT, state))
    while node_inputs[-1] == "":
        node_inputs.pop()
    node_outputs = [o if o in outputs else "" for o in ("Y", "Y_h", "Y_c")]
    while node_outputs[-1] == "":
        node_outputs.pop()
    if opset >= 14:
        attrs["layout"] = layout
    node = helper.make_node("LSTM", node_inputs, node_outputs, name="the_lstm", hidden_size=H, **attrs)
    g = helper.make_graph([node], "lstm", graph_inputs,
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * (4 if o == "Y" else 3))
                           for o in outputs],
                          [numpy_helper.from_array(inits[k].astype(np.float32), k) for k in ("W", "R", "B", "P")
                           if k in ("W", "R") or k in optional])
    if computed_weights:  # W_raw + 0 -> W: not a constant the converter could pack
        zero = numpy_helper.from_array(np.zeros(1, np.float32), "zero")
        for init in g.initializer:
            init.name += "_raw"
        g.initializer.append(zero)
        adds = [helper.make_node("Add", [n + "_raw", "zero"], [n]) for n in ("W", "R", "B", "P")
                if n in ("W", "R") or n in optional]
        lstm_node = list(g.node)
        del g.node[:]
        g.node.extend(adds + lstm_node)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _lstm_node(model):
    return next(n for n in model.graph.node if n.op_type == "LSTM")


def feeds_for(model, T, B, seed):
    rng = np.random.default_rng(seed)
    H = next(a.i for a in _lstm_node(model).attribute if a.name == "hidden_size")  # noqa: N806
    layout = next((a.i for a in _lstm_node(model).attribute if a.name == "layout"), 0)
    D = 2 if any(a.name == "direction" and a.s == b"bidirectional" for a in _lstm_node(model).attribute) else 1
    feeds = {}
    for vi in model.graph.input:
        if vi.name == "X":
            feeds["X"] = rng.standard_normal((T, B, I) if layout == 0 else (B, T, I)).astype(np.float32)
        elif vi.name == "sequence_lens":
            feeds["sequence_lens"] = rng.integers(1, T + 1, B).astype(np.int32)
        else:
            feeds[vi.name] = rng.standard_normal((D, B, H) if layout == 0 else (B, D, H)).astype(np.float32)
    return feeds


def ort_oracle(model, feeds):
    """ONNX Runtime's outputs; for layout 1 (ORT refuses it) the same node at layout 0 on transposed data."""
    layout = next((a.i for a in _lstm_node(model).attribute if a.name == "layout"), 0)
    if layout == 1:
        m0 = onnx.ModelProto()
        m0.CopyFrom(model)
        for a in _lstm_node(m0).attribute:
            if a.name == "layout":
                a.i = 0
        for vi in m0.graph.input:  # shapes become time-major / direction-major
            dims = vi.type.tensor_type.shape.dim
            if len(dims) == 3:
                a, b = dims[0].SerializeToString(), dims[1].SerializeToString()
                dims[0].ParseFromString(b)
                dims[1].ParseFromString(a)
        f0 = {k: (v.transpose(1, 0, 2) if v.ndim == 3 else v) for k, v in feeds.items()}
        outs = ort.InferenceSession(m0.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, f0)
        names = [o.name for o in model.graph.output]
        return [o.transpose(2, 0, 1, 3) if n == "Y" else o.transpose(1, 0, 2) for n, o in zip(names, outs)]
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def check(model, tmp_path, shapes=((5, 3), (9, 2)), threads=None, plan=None, target=None):
    """Compiles once (symbolic T and B; for `threads` cores, or with a KernelPlan, for a target) and
    checks every requested output at each shape against ONNX Runtime."""
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rt = TvmLlvmRuntime(threads=threads, plan=plan, target=target)
    rt.prepare(path)
    for k, (T, B) in enumerate(shapes):
        feeds = feeds_for(model, T, B, seed=k)
        expected = ort_oracle(model, feeds)
        got = rt.run(feeds)
        assert list(got) == [o.name for o in model.graph.output]
        for (name, g), e in zip(got.items(), expected):
            assert g.shape == e.shape, (name, g.shape, e.shape)
            np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5, err_msg=f"{name} at T={T}, B={B}")
    rt.release()



ALL_OPTIONAL = ("B", "sequence_lens", "initial_h", "initial_c", "P")
