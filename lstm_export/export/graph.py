"""A tiny ONNX graph builder: unique names, initializers from numpy, and value infos with named dims."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
          np.dtype(np.int32): TensorProto.INT32}


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs, then makes a checked ModelProto."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._used: set[str] = set()

    def name(self, base: str) -> str:
        """`base`, or `base_2`, `base_3`... if taken."""
        n, k = base, 1
        while n in self._used:
            k += 1
            n = f"{base}_{k}"
        self._used.add(n)
        return n

    def const(self, base: str, value) -> str:
        arr = np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        n = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr), n))
        return n

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None, **attrs):
        """Adds one node; returns its output name (or a list of names when n_out > 1)."""
        base = name or op_type.lower()
        outs = [self.name(f"{base}_out{i}" if n_out > 1 else base) for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(f"{op_type}_{base}"), **attrs))
        return outs if n_out > 1 else outs[0]

    def input(self, name: str, dtype, shape: list) -> str:
        self._used.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, DTYPES[np.dtype(dtype)], shape))
        return name

    def output(self, value: str, name: str, dtype, shape: list) -> str:
        """Exposes `value` as graph output `name` (an Identity renames it if needed)."""
        if value != name:
            self._used.add(name)
            self.nodes.append(helper.make_node("Identity", [value], [name], name=self.name(f"Identity_{name}")))
        self.outputs.append(helper.make_tensor_value_info(name, DTYPES[np.dtype(dtype)], shape))
        return name

    def model(self, graph_name: str, metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="lstm-export")
        # Pin a conservative IR version so older runtimes (ORT, TVM's importer) accept the file.
        model.ir_version = min(model.ir_version, 8 if self.opset <= 18 else 9)
        for k, v in metadata.items():
            model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
        return model
