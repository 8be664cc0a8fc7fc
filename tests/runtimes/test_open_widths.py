"""Recurrent nodes whose input width is not declared (a symbolic dim, an exporter's -1, or no dim
at all) while W is a constant: ONNX Runtime takes the width from W, and so does tvm-llvm, with the
time and batch axes kept symbolic; a feed of another width is refused in one line (#51)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm", reason="apache-tvm is not installed")

from lstm_export.common.errors import UserError  # noqa: E402
from lstm_export.runtimes.base import get_runtime  # noqa: E402

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
H, F = 4, 5
NEWEST = min(onnx.defs.onnx_opset_version(), 21)  # the newest opset both onnx and ONNX Runtime take


def open_width_model(op="LSTM", width="symbolic", direction="forward", peepholes=False, state=False,
                     opset=14, seed=0, **attrs):
    """One recurrent node; X is (T, B, width) where width is "symbolic" (dim_param), "-1", "unnamed"
    (no dim_value nor dim_param: ONNX's unknown), and T and B are -1 with width "-1" (as older
    paddle2onnx writes every dim), else named."""
    g, D = GATES[op], 2 if direction == "bidirectional" else 1
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((D, g * H, F)) * 0.5).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((D, g * H, H)) * 0.5).astype(np.float32), "R"),
             numpy_helper.from_array((rng.standard_normal((D, 2 * g * H)) * 0.3).astype(np.float32), "B")]
    names = ["X", "W", "R", "B"]
    dims = {"symbolic": ["T", "B", "F"], "-1": [-1, -1, -1], "unnamed": ["T", "B", None]}[width]
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, dims)
    if width == "unnamed":
        x.type.tensor_type.shape.dim[2].Clear()
    inputs = [x]
    if state:
        names += ["", "initial_h"] + (["initial_c"] if op == "LSTM" else [])
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [D, dims[1], H]) for n in names[5:]]
    if peepholes:
        names += [""] * (7 - len(names)) + ["P"]
        inits.append(numpy_helper.from_array((rng.standard_normal((D, 3 * H)) * 0.3).astype(np.float32), "P"))
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, names, outs, name=f"the_{op.lower()}", hidden_size=H, direction=direction, **attrs)
    graph = helper.make_graph([node], "open", inputs, [helper.make_tensor_value_info(
        o, TensorProto.FLOAT, [None] * (4 if o == "Y" else 3)) for o in outs], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def feeds(model, T, B, seed=1, width=F):
    rng = np.random.default_rng(seed)
    out = {}
    for v in model.graph.input:
        shape = (T, B, width) if v.name == "X" else (v.type.tensor_type.shape.dim[0].dim_value, B, H)
        out[v.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def check_against_ort(tmp_path, model, shapes=((3, 2), (6, 1)), feeds_of=None):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with get_runtime("tvm-llvm", cache=False) as rt:
        rt.prepare(path)
        for T, B in shapes:
            f = (feeds_of or feeds)(model, T, B)
            want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, f)))
            got = rt.run(f)
            for name, w in want.items():
                np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-5, err_msg=f"{name} at T{T} B{B}")
        assert rt._deferred is None  # one symbolic build ran both shapes: T and B stayed symbolic
        return rt, path


@pytest.mark.parametrize("opset", [7, 14, NEWEST])
@pytest.mark.parametrize("width", ["symbolic", "-1", "unnamed"])
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_the_width_comes_from_w(tmp_path, op, width, opset):
    check_against_ort(tmp_path, open_width_model(op, width, opset=opset))


@pytest.mark.parametrize("opset", [7, 14, NEWEST])
@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
def test_directions_peepholes_and_state_at_each_opset(tmp_path, direction, opset):
    check_against_ort(tmp_path, open_width_model("LSTM", "symbolic", direction, peepholes=True, state=True,
                                                 opset=opset))


@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
@pytest.mark.parametrize("op,attrs", [("GRU", {"linear_before_reset": 1}), ("GRU", {}),
                                      ("RNN", {"activations": ["Tanh"]})])
def test_gru_and_rnn_with_state(tmp_path, op, attrs, direction):
    if direction == "bidirectional" and "activations" in attrs:
        attrs = {"activations": attrs["activations"] * 2}  # one per direction
    check_against_ort(tmp_path, open_width_model(op, "-1", direction, state=True, opset=NEWEST, **attrs))


def test_a_feed_of_another_width_is_one_line(tmp_path):
    model = open_width_model("LSTM", "symbolic")
    check_against_ort(tmp_path, model, shapes=((2, 2),))
    with get_runtime("tvm-llvm", cache=False) as rt:
        rt.prepare(tmp_path / "m.onnx")
        with pytest.raises(UserError, match=r"input X has width 7 .*LSTM node 'the_lstm'.* W for width 5"):
            rt.run(feeds(model, 3, 2, width=7))


def test_compile_keeps_time_and_batch_symbolic(tmp_path):
    """`compile` with no --input-shape: the artifact takes any T and B at the width W needs."""
    from lstm_export.runtimes.tvm_lstm import compile_onnx
    model = open_width_model("GRU", "-1", "reverse")
    onnx.save(model, tmp_path / "m.onnx")
    compiled = compile_onnx(tmp_path / "m.onnx", tmp_path / "art", progress=False)
    assert compiled.meta.input_widths == {"X": [2, F, "GRU node 'the_gru'"]}
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with get_runtime("tvm-llvm") as rt:
        rt.prepare(tmp_path / "art")
        for T, B in ((4, 3), (1, 1)):
            f = feeds(model, T, B)
            for got, want in zip(rt.run(f).values(), sess.run(None, f)):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


INT64_MAX = 2**63 - 1


def _tensor(name, shape, seed, scale=0.5):
    return numpy_helper.from_array((np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32),
                                   name)


def _model(nodes, inputs, outputs, inits, opset=14):
    graph = helper.make_graph(nodes, "pattern", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * k)
                                                        for o, k in outputs], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("width", ["F", -1])
def test_bidirectional_as_two_forward_layers_and_flipping_slices(tmp_path, width):
    """The beat trackers' bidirectional layer: a forward LSTM on X, another on X reversed in time by
    Slice(starts=-1, ends=-INT64_MAX, steps=-1) on the symbolic axis, its output flipped back,
    then Concat: one symbolic build (a flip keeps the extent T), equal to ORT."""
    flip = ["s", "e", "ax", "st"]
    nodes = [helper.make_node("LSTM", ["X", "Wf", "Rf"], ["Yf"], hidden_size=H, name="fwd"),
             helper.make_node("Slice", ["X", *flip], ["Xr"], name="flip_in"),
             helper.make_node("LSTM", ["Xr", "Wb", "Rb"], ["Ybr"], hidden_size=H, name="bwd"),
             helper.make_node("Slice", ["Ybr", *flip], ["Yb"], name="flip_out"),
             helper.make_node("Concat", ["Yf", "Yb"], ["Y"], axis=1)]
    inits = [_tensor("Wf", (1, 4 * H, F), 1), _tensor("Rf", (1, 4 * H, H), 2), _tensor("Wb", (1, 4 * H, F), 3),
             _tensor("Rb", (1, 4 * H, H), 4)] + [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in
                                                  zip(flip, (-1, -INT64_MAX, 0, -1))]
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", width] if width == "F" else [-1, -1, -1])
    check_against_ort(tmp_path, _model(nodes, [x], [("Y", 4)], inits))


def test_rank1_states_broadcast_by_the_graph_with_peepholes(tmp_path):
    """h0 and c0 given as (H,), broadcast to (1, B, H) by Expand over a shape computed from X (ORT
    refuses rank-1 states on the node itself), into an LSTM with peepholes and an open width."""
    nodes = [helper.make_node("Shape", ["X"], ["xs"]), helper.make_node("Gather", ["xs", "one"], ["b"], axis=0),
             helper.make_node("Concat", ["one", "b", "h"], ["state_shape"], axis=0),
             helper.make_node("Expand", ["h0", "state_shape"], ["h0e"]),
             helper.make_node("Expand", ["c0", "state_shape"], ["c0e"]),
             helper.make_node("LSTM", ["X", "W", "R", "", "", "h0e", "c0e", "P"], ["Y", "Y_h", "Y_c"], hidden_size=H,
                              name="peepholes")]
    inits = [_tensor("W", (1, 4 * H, F), 5), _tensor("R", (1, 4 * H, H), 6), _tensor("P", (1, 3 * H), 7, 0.3),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([H], np.int64), "h")]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", "F"]),
              helper.make_tensor_value_info("h0", TensorProto.FLOAT, [H]),
              helper.make_tensor_value_info("c0", TensorProto.FLOAT, [H])]

    def feeds_of(model, T, B):
        rng = np.random.default_rng(T * B)
        return {"X": rng.standard_normal((T, B, F)).astype(np.float32),
                "h0": rng.standard_normal(H).astype(np.float32), "c0": rng.standard_normal(H).astype(np.float32)}
    check_against_ort(tmp_path, _model(nodes, inputs, [("Y", 4), ("Y_h", 3), ("Y_c", 3)], inits), feeds_of=feeds_of)


def test_only_a_whole_axis_reversal_is_a_flip():
    from lstm_export.runtimes.tvm_lstm.frontend.flip import reversed_axes
    from lstm_export.runtimes.tvm_lstm.frontend.slice_bounds import BOUND
    assert reversed_axes(3, [-1], [-BOUND], [0], [-1]) == [0]
    assert reversed_axes(3, [-1, BOUND], [-BOUND, -BOUND], [-3, 2], [-1, -1]) == [0, 2]
    assert reversed_axes(3, [-1], [-BOUND], [0], [-2]) is None  # every other element
    assert reversed_axes(3, [-2], [-BOUND], [0], [-1]) is None  # not from the last element
    assert reversed_axes(3, [-1], [-3], [0], [-1]) is None  # not to the front on every length
    assert reversed_axes(3, [0], [BOUND], [0], [1]) is None  # forward
    assert reversed_axes(3, [-1, 0], [-BOUND, 2], [0, 1], [-1, 1]) is None  # a flip and a cut: TVM's own Slice


def test_lstms_in_if_branches_on_a_sample_rate_with_flips(tmp_path):
    """A VAD's shape: an If on the sample rate, each branch a bidirectional pair of forward LSTMs with
    flipping Slices on the symbolic time axis, X's width open. `run` takes each sample rate and two
    feed shapes, as ONNX Runtime does."""
    flip = ["s", "e", "ax", "st"]

    def branch(tag):
        nodes = [helper.make_node("LSTM", ["X", f"Wf{tag}", f"Rf{tag}"], [f"Yf{tag}"], hidden_size=H, name=f"f{tag}"),
                 helper.make_node("Slice", ["X", *flip], [f"Xr{tag}"]),
                 helper.make_node("LSTM", [f"Xr{tag}", f"Wb{tag}", f"Rb{tag}"], [f"Ybr{tag}"], hidden_size=H,
                                  name=f"b{tag}"),
                 helper.make_node("Slice", [f"Ybr{tag}", *flip], [f"Yb{tag}"]),
                 helper.make_node("Concat", [f"Yf{tag}", f"Yb{tag}"], [f"Y{tag}"], axis=1)]
        return helper.make_graph(nodes, f"branch{tag}", [], [helper.make_tensor_value_info(f"Y{tag}", TensorProto.FLOAT,
                                                                                           [None] * 4)])
    inits = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in zip(flip, (-1, -INT64_MAX, 0, -1))]
    for k, tag in enumerate(("16", "8")):
        inits += [_tensor(f"Wf{tag}", (1, 4 * H, F), 10 + k), _tensor(f"Rf{tag}", (1, 4 * H, H), 20 + k),
                  _tensor(f"Wb{tag}", (1, 4 * H, F), 30 + k), _tensor(f"Rb{tag}", (1, 4 * H, H), 40 + k)]
    inits.append(numpy_helper.from_array(np.array(16000, np.int64), "rate16"))
    nodes = [helper.make_node("Equal", ["sr", "rate16"], ["is16"]),
             helper.make_node("If", ["is16"], ["Y"], then_branch=branch("16"), else_branch=branch("8"))]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", None]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
    inputs[0].type.tensor_type.shape.dim[2].Clear()
    model = _model(nodes, inputs, [("Y", 4)], inits)
    path = tmp_path / "vad.onnx"
    onnx.save(model, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with get_runtime("tvm-llvm", cache=False) as rt:
        rt.prepare(path)
        for rate, (T, B) in ((16000, (5, 1)), (8000, (5, 1)), (16000, (3, 2)), (8000, (7, 2))):
            f = {"X": np.random.default_rng(T + B).standard_normal((T, B, F)).astype(np.float32),
                 "sr": np.array(rate, np.int64)}
            np.testing.assert_allclose(rt.run(f)["Y"], sess.run(None, f)[0], rtol=1e-5, atol=1e-5,
                                       err_msg=f"sr={rate} T{T} B{B}")


def test_a_symbolic_build_that_cannot_load_is_built_for_the_feeds(tmp_path, monkeypatch):
    """Whatever stops the symbolic build (here its load, as a std::bad_alloc did), `run` builds for
    the feeds' shapes instead, as `compile --input-shape` would, and matches ORT."""
    from lstm_export.runtimes import tvm_runtime
    real, calls = tvm_runtime.TvmLlvmRuntime._load, []

    def load(self, compiled, where):
        calls.append(dict(compiled.meta.input_shapes))
        if not compiled.meta.input_shapes:
            raise RuntimeError("InternalError: std::bad_alloc")
        return real(self, compiled, where)
    monkeypatch.setattr(tvm_runtime.TvmLlvmRuntime, "_load", load)
    model = open_width_model("LSTM", "symbolic", "bidirectional")
    onnx.save(model, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with get_runtime("tvm-llvm", cache=False) as rt:
        rt.prepare(tmp_path / "m.onnx")
        f = feeds(model, 4, 3)
        for got, want in zip(rt.run(f).values(), sess.run(None, f)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert calls == [{}, {"X": [4, 3, F]}]


def test_a_model_neither_build_takes_is_one_line_and_exit_2(tmp_path, cli_here):
    """An op TVM has no converter for, on symbolic dims: the build for the feeds fails too, and
    `run` says so in one line naming the op, exit 2."""
    node = helper.make_node("ReverseSequence", ["X", "lens"], ["Y"], batch_axis=1, time_axis=0)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", 3]),
              helper.make_tensor_value_info("lens", TensorProto.INT64, ["B"])]
    onnx.save(_model([node], inputs, [("Y", 3)], []), tmp_path / "rs.onnx")
    np.savez(tmp_path / "in.npz", X=np.ones((4, 2, 3), np.float32), lens=np.array([4, 2], np.int64))
    r = cli_here("run", tmp_path / "rs.onnx", "--runtime", "tvm-llvm", "--inputs", tmp_path / "in.npz",
                 "--no-cache", "--outputs", tmp_path / "out.npz")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "ReverseSequence" in lines[0] and "X=4x2x3" in lines[0], r.stderr
