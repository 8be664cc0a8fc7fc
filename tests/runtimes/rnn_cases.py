"""ONNX GRU and RNN models made in the test, their feeds, and ONNX Runtime as the oracle."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

H, I = 5, 3
GATES = {"GRU": 3, "RNN": 1}


def rnn_model(op, D=1, layout=0, optional=("B", "sequence_lens", "initial_h"), outputs=("Y", "Y_h"), opset=14,
              seed=0, hidden=H, inputs_size=I, computed_weights=False, **attrs):
    """One GRU or RNN node with random constant weights; with `computed_weights` W and R are graph
    inputs instead (fed by feeds_for), so that no kernel can pack them at compile time."""
    g_ = GATES[op]
    rng = np.random.default_rng(seed)
    scale = 0.5 / max(1.0, np.sqrt(hidden / H))  # keeps pre-activations O(1) for wide layers
    inits = {"W": rng.standard_normal((D, g_ * hidden, inputs_size)) * 0.5,
             "R": rng.standard_normal((D, g_ * hidden, hidden)) * scale,
             "B": rng.standard_normal((D, 2 * g_ * hidden)) * 0.3}
    t_, b_ = ("time", "batch") if layout == 0 else ("batch", "time")
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [t_, b_, inputs_size])]
    if computed_weights:
        inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(inits[k].shape)) for k in ("W", "R")]
    if "sequence_lens" in optional:
        inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["batch"]))
    if "initial_h" in optional:
        inputs.append(helper.make_tensor_value_info("initial_h", TensorProto.FLOAT,
                                                    [D, "batch", hidden] if layout == 0 else ["batch", D, hidden]))
    node_inputs = [n if n in ("X", "W", "R") or n in optional else "" for n in
                   ("X", "W", "R", "B", "sequence_lens", "initial_h")]
    while node_inputs[-1] == "":
        node_inputs.pop()
    node_outputs = [o if o in outputs else "" for o in ("Y", "Y_h")]
    while node_outputs[-1] == "":
        node_outputs.pop()
    if opset >= 14:
        attrs["layout"] = layout
    node = helper.make_node(op, node_inputs, node_outputs, name="the_rnn", hidden_size=hidden, **attrs)
    constant = ("B",) if computed_weights else ("W", "R", "B")
    g = helper.make_graph([node], "rnn", inputs,
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * (4 if o == "Y" else 3))
                           for o in outputs],
                          [numpy_helper.from_array(inits[k].astype(np.float32), k) for k in constant
                           if k in ("W", "R") or k in optional])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    if computed_weights:
        m.doc_string = "weights are inputs"
        m.metadata_props.add(key="W", value=" ".join(map(str, inits["W"].astype(np.float32).ravel())))
        m.metadata_props.add(key="R", value=" ".join(map(str, inits["R"].astype(np.float32).ravel())))
    return m


def _attr(node, name, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def feeds_for(model, T, B, seed):
    rng = np.random.default_rng(seed)
    node = model.graph.node[0]
    layout = _attr(node, "layout", 0)
    hidden = _attr(node, "hidden_size", H)
    D = 2 if _attr(node, "direction", b"forward") == b"bidirectional" else 1
    inputs = {vi.name: vi for vi in model.graph.input}
    size = inputs["X"].type.tensor_type.shape.dim[2].dim_value
    feeds = {"X": rng.standard_normal((T, B, size) if layout == 0 else (B, T, size)).astype(np.float32)}
    for p in model.metadata_props:  # computed weights: the values the model was made with
        dims = [d.dim_value for d in inputs[p.key].type.tensor_type.shape.dim]
        feeds[p.key] = np.array(p.value.split(), np.float32).reshape(dims)
    if "sequence_lens" in inputs:
        feeds["sequence_lens"] = rng.integers(1, T + 1, B).astype(np.int32)
    if "initial_h" in inputs:
        feeds["initial_h"] = rng.standard_normal((D, B, hidden) if layout == 0 else (B, D, hidden)).astype(np.float32)
    return feeds


def ort_outputs(model, feeds):
    """ONNX Runtime's outputs; layout 1 (which ORT refuses) as layout 0 on transposed data."""
    node = model.graph.node[0]
    if _attr(node, "layout", 0) == 0:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    m0 = onnx.ModelProto()
    m0.CopyFrom(model)
    next(a for a in m0.graph.node[0].attribute if a.name == "layout").i = 0
    for vi in m0.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 3 and vi.name in ("X", "initial_h"):
            a, b = dims[0].SerializeToString(), dims[1].SerializeToString()
            dims[0].ParseFromString(b)
            dims[1].ParseFromString(a)
    f0 = {k: (v.transpose(1, 0, 2) if k in ("X", "initial_h") else v) for k, v in feeds.items()}
    outs = ort.InferenceSession(m0.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, f0)
    names = [o.name for o in model.graph.output]
    return [o.transpose(2, 0, 1, 3) if n == "Y" else o.transpose(1, 0, 2) for n, o in zip(names, outs)]


def check(model, tmp_path, shapes=((5, 3), (8, 2)), plan=None, target=None, atol=1e-5, runtime=None):
    """Compiles once (with a KernelPlan and target where given; on `runtime`, a TVM runtime class,
    default tvm-llvm) and checks every output at each (T, B) against ONNX Runtime."""
    from lstm_export.runtimes.tvm_runtime import TvmLlvmRuntime
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rt = (runtime or TvmLlvmRuntime)(cache=False, plan=plan, target=target)
    rt.prepare(path)
    for k, (T, B) in enumerate(shapes):
        feeds = feeds_for(model, T, B, seed=k)
        got = rt.run(feeds)
        for name, want in zip([o.name for o in model.graph.output], ort_outputs(model, feeds)):
            np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=atol, err_msg=f"{name} T={T} B={B}")
    rt.release()
