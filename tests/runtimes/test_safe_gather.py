"""Gathers in a TVM-compiled model check their indices in the artifact itself: out of range is an
error naming the node (with the TVM runtime alone, and through `run` as one line, exit 2), never a
crash or a read past the table. Oracle: numpy's take and ONNX Runtime on the same model."""
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("tvm")

from lstm_export.runtimes.tvm_lstm.pipeline.compile import compile_onnx  # noqa: E402

pytestmark = pytest.mark.tvm
TABLE = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)


def _model(path):
    """ids (n,) -> ids + offset -> Gather over a 7-row table: the index is computed, so only the
    artifact can check it (the runtime contract checks only graph inputs that index a table)."""
    nodes = [helper.make_node("Add", ["ids", "offset"], ["shifted"]),
             helper.make_node("Gather", ["table", "shifted"], ["rows"], axis=0, name="lookup")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]),
                                       helper.make_tensor_value_info("offset", TensorProto.INT64, [1])],
                          [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", 3])],
                          [helper.make_tensor("table", TensorProto.FLOAT, [7, 3], TABLE.ravel())])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("gather")
    return compile_onnx(_model(d / "g.onnx"), d / "art", target="llvm", progress=False)


DEPLOYED = r'''
import sys, numpy as np, tvm
from tvm.runtime.vm import VirtualMachine
vm = VirtualMachine(tvm.runtime.load_module(sys.argv[1] + "/model.so"), tvm.cpu())
for ids in ([0, 6, 3], [-7, -1], [7], [100000], [-8], [2**40]):
    try:
        rows = vm["main"](tvm.runtime.tensor(np.array(ids, np.int64)), tvm.runtime.tensor(np.zeros(1, np.int64)))
        print("ok", np.from_dlpack(rows).tolist())
    except Exception as e:
        print("refused", str(e).strip().splitlines()[0])
'''


def test_the_artifact_refuses_out_of_range_indices_with_the_runtime_alone(artifact):
    r = subprocess.run([sys.executable, "-c", DEPLOYED, str(artifact.folder)], capture_output=True, text=True,
                       env=dict(os.environ, TVM_USE_RUNTIME_LIB="1"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]  # no crash (was exit 139)
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "ok " + str(np.take(TABLE, [0, 6, 3], axis=0).tolist())
    assert lines[1] == "ok " + str(np.take(TABLE, [-7, -1], axis=0).tolist())  # ONNX: negative from the end
    assert all(line.startswith("refused Gather node 'lookup': an index is outside [-7, 7)") for line in lines[2:])
    assert len(lines) == 6


def test_run_turns_it_into_one_line_exit_2(cli_here, artifact, tmp_path):
    np.savez(tmp_path / "bad.npz", ids=np.array([1, 5], np.int64), offset=np.array([3], np.int64))
    r = cli_here("run", artifact.folder, "--runtime", "tvm-llvm", "--inputs", tmp_path / "bad.npz",
                 "--outputs", tmp_path / "o.npz")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "tvm-llvm failed to run" in r.stderr and "Gather node 'lookup'" in r.stderr
    assert not (tmp_path / "o.npz").exists()
    np.savez(tmp_path / "ok.npz", ids=np.array([1, 5], np.int64), offset=np.array([1], np.int64))
    for rt in ("tvm-llvm", "ort-cpu"):
        r = cli_here("run", artifact.folder, "--runtime", rt, "--inputs", tmp_path / "ok.npz",
                     "--outputs", tmp_path / f"{rt}.npz")
        assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "tvm-llvm.npz") as a, np.load(tmp_path / "ort-cpu.npz") as b:
        np.testing.assert_array_equal(a["rows"], b["rows"])


# --- GatherElements and GatherND: the same check, per the data dim each index reads ---------------

DATA = np.arange(4 * 5 * 2, dtype=np.float32).reshape(4, 5, 2)


def _indexing_model(path, op, index_shape, **attrs):
    """data (4, 5, 2) constant, `idx` a graph input of `index_shape` -> op."""
    node = helper.make_node(op, ["data", "idx"], ["out"], name="pick", **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("idx", TensorProto.INT64, index_shape)],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                         index_shape if op == "GatherElements" else ["n", 2])],
                          [helper.make_tensor("data", TensorProto.FLOAT, list(DATA.shape), DATA.ravel())])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


RUN_ALONE = r'''
import sys, json, numpy as np, tvm
from tvm.runtime.vm import VirtualMachine
vm = VirtualMachine(tvm.runtime.load_module(sys.argv[1] + "/model.so"), tvm.cpu())
for idx in json.loads(sys.argv[2]):
    try:
        print("ok", json.dumps(np.from_dlpack(vm["main"](tvm.runtime.tensor(np.array(idx, np.int64)))).tolist()))
    except Exception as e:
        print("refused", str(e).strip().splitlines()[0])
'''

CASES = {  # op, index shape, attrs, good index arrays, bad ones, the refusal's start
    "GatherElements": ("GatherElements", ["n", 5, 2], {"axis": 0},
                       [np.zeros((1, 5, 2)), np.full((2, 5, 2), 3), np.full((1, 5, 2), -4)],
                       [np.full((1, 5, 2), 4), np.full((1, 5, 2), -5)],
                       "GatherElements node 'pick': an index is outside [-4, 4)"),
    "GatherND": ("GatherND", ["n", 2], {},
                 [[[0, 0], [3, 4]], [[-1, -5], [2, -1]]],
                 [[[4, 0]], [[0, 5]], [[-5, 0]], [[0, -6]], [[0, 1 << 40]]],
                 "GatherND node 'pick': an index is outside the extent of the data dimension it reads (4, 5)"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_indexing_ops_check_each_index_in_the_artifact(tmp_path, name):
    """Valid indices (negative ones included) give ORT's values; any index past the data dim it
    reads is refused by model.so under the TVM runtime alone, with the node's name."""
    import json

    import onnxruntime as ort
    op, shape, attrs, good, bad, refusal = CASES[name]
    path = _indexing_model(tmp_path / "m.onnx", op, shape, **attrs)
    art = compile_onnx(path, tmp_path / "art", target="llvm", progress=False)
    arrays = [np.asarray(a, np.int64).tolist() for a in good + bad]
    r = subprocess.run([sys.executable, "-c", RUN_ALONE, str(art.folder), json.dumps(arrays)], capture_output=True,
                       text=True, env=dict(os.environ, TVM_USE_RUNTIME_LIB="1"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(arrays)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for line, idx in zip(lines[:len(good)], good):
        want = sess.run(None, {"idx": np.asarray(idx, np.int64)})[0]
        assert line.startswith("ok "), line
        np.testing.assert_array_equal(np.array(json.loads(line[3:]), np.float32), want)
    for line in lines[len(good):]:
        assert line.startswith("refused " + refusal), line


def test_gather_elements_index_dims_past_the_data_are_refused_at_import(tmp_path):
    from lstm_export.common.errors import UserError
    path = _indexing_model(tmp_path / "m.onnx", "GatherElements", [1, 6, 2], axis=0)  # dim 1: 6 > 5
    with pytest.raises(UserError, match="GatherElements node 'pick': indices dim 1 is 6, past data's 5"):
        compile_onnx(path, tmp_path / "art", target="llvm", progress=False)


def test_gather_elements_graph_inputs_are_bounded_by_the_contract(tmp_path):
    """The runtime contract knows GatherElements' table, as Gather's: random feeds stay inside it and
    a feed past it is one error before any runtime runs (ORT agrees the random one is valid)."""
    import onnxruntime as ort

    from lstm_export.common.errors import UserError
    from lstm_export.runtimes.model_io import check_feeds, index_bounds, input_specs, random_feeds
    model = onnx.load(_indexing_model(tmp_path / "m.onnx", "GatherElements", ["n", 5, 2], axis=0))
    assert index_bounds(model) == {"idx": 4}
    feeds = random_feeds(model, seed=0, dims={"n": 3})
    assert 0 <= feeds["idx"].min() and feeds["idx"].max() < 4
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    with pytest.raises(UserError, match=r"input idx holds ids 0\.\.4, outside \[0, 4\)"):
        check_feeds(input_specs(model), {"idx": np.array([[[0, 4]] * 5], np.int64)}, index_bounds(model))
