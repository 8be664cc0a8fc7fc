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

from runtimes.tvm_lstm.compile import compile_onnx  # noqa: E402

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
    return compile_onnx(_model(d / "g.onnx"), d / "art", "llvm", progress=False)


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
