"""#37's failure classes as small models, against ONNX Runtime: a reverse Slice with INT64 extremes
on a symbolic axis (class 1), a Reshape whose target is computed from Shape (class 2), a Pad whose
pads come from the input's length (class 3), at top level and inside an If branch; and compile's
--input-shape hints (class 4), followed as printed. Each failure is one line with exit 2."""
from __future__ import annotations

import re

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from lstm_export.runtimes.base import get_runtime

pytestmark = pytest.mark.skipif(not get_runtime("tvm-llvm").availability().ok, reason="apache-tvm is not installed")
I64 = np.iinfo(np.int64).max


def _c(name, v):
    return nh.from_array(np.array(v, np.int64), name)


def _flip(axis):  # torch.flip's export: Slice(-1, -INT64_MAX, step -1)
    return [h.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"])], \
        [_c("s", [-1]), _c("e", [-I64]), _c("a", [axis]), _c("st", [-1])]


def _tail(axis):  # x[:, 1:]: ends INT64_MAX
    return [h.make_node("Slice", ["x", "s", "e", "a"], ["y"])], [_c("s", [1]), _c("e", [I64]), _c("a", [axis])]


def _tensordot(_):  # tf2onnx's Tensordot: Reshape(x, [B*T, -1]) from Shape -> Gather -> Mul -> Concat
    return [h.make_node("Shape", ["x"], ["sh"]), h.make_node("Gather", ["sh", "i0"], ["b"], axis=0),
            h.make_node("Gather", ["sh", "i1"], ["t"], axis=0), h.make_node("Mul", ["b", "t"], ["bt"]),
            h.make_node("Concat", ["bt", "m1"], ["tgt"], axis=0), h.make_node("Reshape", ["x", "tgt"], ["y"])], \
        [_c("i0", [0]), _c("i1", [1]), _c("m1", [-1])]


def _pad_to_4(mode):  # F.pad(x, (0, (4 - T % 4))) on the time axis, as torch exports it
    return [h.make_node("Shape", ["x"], ["sh"]), h.make_node("Slice", ["sh", "one", "two"], ["t"]),
            h.make_node("Mod", ["t", "four"], ["r"]), h.make_node("Sub", ["four", "r"], ["p"]),
            h.make_node("Concat", ["z", "z", "z", "z", "p", "z"], ["pads"], axis=0),
            h.make_node("Pad", ["x", "pads"], ["y"], mode=mode)], \
        [_c("one", [1]), _c("two", [2]), _c("four", [4]), _c("z", [0])]


def _model(pattern, arg, opset, in_if):
    nodes, inits = pattern(arg)
    x = h.make_tensor_value_info("x", TP.FLOAT, ["B", "T", 4])
    rank = 2 if pattern is _tensordot else 3
    y = h.make_tensor_value_info("y", TP.FLOAT, [f"y{k}" for k in range(rank)])
    inputs = [x]
    if in_if:  # a VAD's sample-rate switch: the pattern in the then branch, Identity in the else
        then = h.make_graph(nodes, "then", [], [y], inits)
        # both branches give one rank: for a rank-2 pattern the else branch flattens
        other_node = h.make_node("Flatten", ["x"], ["y2"], axis=2) if rank == 2 else \
            h.make_node("Identity", ["x"], ["y2"])
        other = h.make_graph([other_node], "else", [],
                             [h.make_tensor_value_info("y2", TP.FLOAT, [f"e{k}" for k in range(rank)])])
        nodes = [h.make_node("Equal", ["sr", "k"], ["c"]),
                 h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
        inits = [_c("k", 16000)]
        inputs.append(h.make_tensor_value_info("sr", TP.INT64, []))
    g = h.make_graph(nodes, "g", inputs, [y], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    return m


CASES = [(_flip, 1, 17, False), (_flip, 2, 13, False), (_flip, 1, 18, True), (_tail, 1, 11, False),
         (_tensordot, None, 13, False), (_tensordot, None, 17, True), (_pad_to_4, "constant", 13, False),
         (_pad_to_4, "reflect", 18, True), (_pad_to_4, "edge", 11, False)]


@pytest.mark.parametrize("pattern,arg,opset,in_if", CASES,
                         ids=[f"{p.__name__[1:]}-{a}-op{o}{'-if' if i else ''}" for p, a, o, i in CASES])
def test_pattern_matches_ort(tmp_path, pattern, arg, opset, in_if):
    import onnx
    path = tmp_path / "m.onnx"
    onnx.save(_model(pattern, arg, opset, in_if), path)
    ort, tvm = get_runtime("ort-cpu"), get_runtime("tvm-llvm", cache=False)
    ort.prepare(path)
    tvm.prepare(path)
    rng = np.random.default_rng(0)
    for shape in [(2, 5, 4), (1, 8, 4)]:  # two shapes: each feed's shapes get their own build
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        if in_if:
            feeds["sr"] = np.array(16000, np.int64)
        want, got = ort.run(feeds)["y"], tvm.run(feeds)["y"]
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)  # data movement only: bit-exact


@pytest.mark.slow
@pytest.mark.parametrize("pattern,arg", [(_tensordot, None), (_pad_to_4, "reflect")])
def test_compile_failure_is_one_line_and_its_hint_works(cli_here, tmp_path, pattern, arg):
    import onnx
    path = tmp_path / "m.onnx"
    onnx.save(_model(pattern, arg, 17, False), path)
    r = cli_here("compile", path, "--out", tmp_path / "a")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.search(r"TVM cannot import (Reshape|Pad|Mod) node 'node_\d+'", r.stderr), r.stderr
    hint = re.search(r"`lstm-export compile \S+ (.*?)`", r.stderr).group(1)
    assert "<B>x<T>x4" in hint, hint  # each open dim named as the model names it
    args = re.sub(r"<\w+(\.dim\d+)?>", "3", hint).split()  # the hint, followed with numbers
    r = cli_here("compile", path, "--out", tmp_path / "b", *args)
    assert r.returncode == 0, r.stderr


def test_unnamed_dims_get_their_own_placeholders(tmp_path):
    import onnx

    from lstm_export.runtimes.source import open_model
    from lstm_export.runtimes.tvm_lstm.pipeline.shape_hint import shape_hint
    m = _model(_tensordot, None, 17, False)
    d = m.graph.input[0].type.tensor_type.shape.dim
    d[0].dim_value = -1  # an exporter's -1 and an unnamed dim: no shared placeholder
    d[1].Clear()
    onnx.save(m, tmp_path / "m.onnx")
    hint = shape_hint(open_model(tmp_path / "m.onnx"))
    assert hint is not None and hint[0] == "--input-shape x=<x.dim0>x<x.dim1>x4", hint
