"""One parser for the ONNX LSTM, GRU and RNN nodes (frontend/rnn_node.parse_rnn_node): the same bad attribute
gets the same one-line error from each op's converter, naming the node."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lstm_export.common.errors import UserError

pytest.importorskip("tvm")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
I, H = 3, 4


def _model(op: str, x_shape=(5, 2, I), **attrs) -> onnx.ModelProto:
    g = GATES[op]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1, g * H, I)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((1, g * H, H)).astype(np.float32), "R")]
    node = helper.make_node(op, ["X", "W", "R"], ["Y"], name="the_node", hidden_size=H, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [5, 1, 2, H])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


@pytest.mark.parametrize("op", sorted(GATES))
@pytest.mark.parametrize("attrs, message", [
    ({"layout": 2}, "layout 2 must be 0 or 1"),
    ({"direction": "sideways"}, "direction 'sideways' is not forward, reverse or bidirectional"),
    ({"x_shape": (5, I)}, "X must be 3-D, got rank 2"),
])
def test_the_same_bad_node_gets_the_same_error_from_each_op(op, attrs, message, tmp_path):
    from lstm_export.runtimes.tvm_lstm.pipeline.compile import compile_onnx
    path = tmp_path / "bad.onnx"
    onnx.save(_model(op, **attrs), path)
    with pytest.raises(UserError) as e:
        compile_onnx(path, tmp_path / "out", plan_budget_s=0, progress=False)
    assert f"{op} node 'the_node': {message}" in str(e.value) and "\n" not in str(e.value)
