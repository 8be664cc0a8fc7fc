"""Slice bounds at the int64 extremes, brought into a range TVM's index arithmetic can hold.

Exporters write a flip or a reflect pad as Slice(x, starts=[-1], ends=[-INT64_MAX], steps=[-1])
("to the front, whatever the length"), and a tail as ends=[INT64_MAX]. ONNX clamps such bounds to
the axis. On a static axis TVM folds the clamp; on a symbolic one it keeps `end + dim` and friends
as int64 literals, which overflow ("Literal value 36893488147419103224 exceeds range of int64"),
at import or at build. ONNX Runtime runs them.

Invariant: a bound beyond +-BOUND is replaced by +-BOUND, which ONNX's clamp maps to the same index
on every axis shorter than BOUND (2^32 elements: 16 GiB of float32 along one axis, more than any
tensor these models hold), for positive and negative steps alike; BOUND times any stride that fits
int32 still fits int64. Nothing else changes.
"""
from __future__ import annotations

import numpy as np

BOUND = 1 << 32


def clamp_slice_bounds(model):
    """`model` itself when no Slice has a bound beyond +-BOUND, else a copy whose Slices (in every
    If/Loop/Scan body too) read clamped bounds: new Constant nodes beside them (the originals may
    feed other nodes), or clamped attributes for Slice-1."""
    if not any(_needs(n, consts) for g, consts in _graphs(model.graph) for n in g.node if n.op_type == "Slice"):
        return model
    import onnx
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for g, consts in _graphs(m.graph):
        _clamp_graph(g, consts)
    return m


def _graphs(graph, outer=None):
    """(graph, the int64 constants it sees: its own and those of the graphs around it), for `graph`
    and every graph nested in its nodes' attributes."""
    from onnx import numpy_helper
    consts = dict(outer or {})
    consts.update({i.name: numpy_helper.to_array(i) for i in graph.initializer})
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    yield graph, consts
    for n in graph.node:
        for a in n.attribute:
            if a.g.node:
                yield from _graphs(a.g, consts)
            for sub in a.graphs:
                yield from _graphs(sub, consts)


def _beyond(values) -> bool:
    a = np.asarray(values)
    return a.dtype == np.int64 and a.size > 0 and bool(np.any(np.abs(a.astype(np.float64)) > BOUND))


def _needs(node, consts) -> bool:
    if any(a.name in ("starts", "ends") and _beyond(np.array(a.ints, np.int64)) for a in node.attribute):
        return True
    return any(k < len(node.input) and node.input[k] in consts and _beyond(consts[node.input[k]]) for k in (1, 2))


def _clamp_graph(g, consts) -> None:
    from onnx import helper, numpy_helper
    for a in (a for n in g.node if n.op_type == "Slice" for a in n.attribute if a.name in ("starts", "ends")):
        a.ints[:] = [int(v) for v in np.clip(np.array(a.ints, np.int64), -BOUND, BOUND)]  # Slice-1
    k = 0
    while k < len(g.node):
        n = g.node[k]
        if n.op_type == "Slice":
            for i in (1, 2):
                name = n.input[i] if i < len(n.input) else ""
                if name in consts and _beyond(consts[name]):
                    clamped = f"{name}__clamped_{k}_{i}"
                    value = np.clip(consts[name], -BOUND, BOUND).astype(np.int64)
                    g.node.insert(k, helper.make_node("Constant", [], [clamped],
                                                      value=numpy_helper.from_array(value, clamped)))
                    k += 1
                    n = g.node[k]  # protobuf hands out a fresh wrapper after the insert
                    n.input[i] = clamped
        k += 1
