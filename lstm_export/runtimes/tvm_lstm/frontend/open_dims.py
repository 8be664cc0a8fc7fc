"""Open graph-input dims named before TVM imports the graph.

An exporter may leave a dim open without naming it (no dim_value, no dim_param) or write -1 for it
(older paddle2onnx writes -1 for every dim). ONNX Runtime takes both as "any size". TVM 0.27's
importer does not: it makes one symbolic variable per dim *name*, so every unnamed dim of the graph
becomes the same variable (time = batch = width), and it keeps -1 as a size of -1. Here each such
dim gets a name of its own, `<input>.dim<k>`, which no exporter's name can collide with.
"""
from __future__ import annotations


def _open(d) -> bool:
    return not d.HasField("dim_param") and (not d.HasField("dim_value") or d.dim_value <= 0)


def name_open_dims(model):
    """`model`, or a copy whose graph inputs' unnamed and -1 dims are named (see the module
    docstring); the input is not changed."""
    inputs = [v for v in model.graph.input if v.type.HasField("tensor_type")]
    if not any(_open(d) for v in inputs for d in v.type.tensor_type.shape.dim):
        return model
    import onnx
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for v in m.graph.input:
        for k, d in enumerate(v.type.tensor_type.shape.dim):
            if v.type.HasField("tensor_type") and _open(d):
                d.dim_param = f"{v.name}.dim{k}"  # clears dim_value: the protobuf oneof
    return m
