"""Simplify an exported graph before TVM imports it: fold the shape arithmetic exporters emit.

torch.onnx.export writes `F.pad(x, (0, (4 - x.shape[-1] % 4) % 4))` as Shape -> Gather -> Mod ->
Sub -> ... -> Pad: constant for the static dims of the input, but TVM's importer sees a computed
`pads` and stops ("Dynamic pads are not supported yet"). ONNX Runtime folds it away at load time.

Two steps:
1. Picks of static dims are made constants: `Gather(Shape(x), k)` and `Shape(x, start, end)` where
   shape inference (with data propagation) knows those dims of x. No library does this while other
   dims stay symbolic: onnxscript's optimizer and ORT's offline basic level (both tried) fold a
   Shape only when every dim is known, so a dynamic batch axis blocks the whole chain.
2. onnxscript's optimizer (already a dependency, maintained with the ONNX exporter, and it writes
   standard ops only, where ORT's offline output may use its contrib ops) folds the constant
   arithmetic that follows and removes what is left unused.
Symbolic dims stay symbolic; `dims` (compile --dim NAME=N) fixes named ones first, for graphs whose
shape arithmetic reads a dim that is symbolic.
"""
from __future__ import annotations

import numpy as np

SHAPE_OPS = {"Shape", "Size"}


def all_nodes(graph):
    """Every node of `graph` and of the subgraphs in its nodes' attributes."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.g.node:
                yield from all_nodes(a.g)


def needs_simplifying(model) -> bool:
    """Shape arithmetic to fold, or a Pad whose pads are computed: TVM takes pads as constants only
    ("Dynamic pads are not supported yet"), and an exporter may compute them from constants alone
    (silero-vad's OpenVINO export: ConstantOfShape -> Concat -> Reshape -> Slice -> ... -> Pad),
    which the folding below turns into one constant."""
    nodes = list(all_nodes(model.graph))
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in nodes if n.op_type == "Constant" for o in n.output}
    computed_pads = (n for n in nodes if n.op_type == "Pad" and len(n.input) > 1 and n.input[1])
    return any(n.op_type in SHAPE_OPS for n in nodes) or any(n.input[1] not in constants for n in computed_pads)


def simplify(model, dims: dict[str, int] | None = None, shapes: dict[str, tuple] | None = None,
             values: dict | None = None, specs=None):
    """A simplified copy of `model` (see the module docstring); the input is not changed. `dims`
    (symbolic dim -> size) and `shapes` (input -> its whole static shape, compile --input-shape)
    are written into the graph inputs first, so shape inference and the folding see them; `values`
    (scalar input -> its value) become constants (bind_values; `specs`: the model's input specs)."""
    import onnx
    import onnxscript.optimizer
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if values:
        bind_values(m, values, specs)
    for v in m.graph.input:
        fixed = (shapes or {}).get(v.name)
        for k, d in enumerate(v.type.tensor_type.shape.dim):
            if fixed is not None:
                d.dim_value = int(fixed[k])  # clears dim_param: the protobuf oneof
            elif d.HasField("dim_param") and d.dim_param in (dims or {}):
                d.dim_value = dims[d.dim_param]
    _drop_stale_shapes(m)
    for _ in range(4):  # a folded chain can expose the next Shape (of a value that became constant)
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
        if not _fold_static_shape_picks(m):
            break
        m = onnxscript.optimizer.optimize(m)
    return onnxscript.optimizer.optimize(m)


def bind_values(model, values: dict, specs) -> None:
    """Scalar inputs fixed to one value (compile --input-value sr=16000), in place: each becomes an
    initializer, so an If on it (a sample-rate switch) folds to the branch taken, as ONNX Runtime
    runs only that one; TVM would have to import both, and the other may not fit the shapes."""
    from onnx import numpy_helper

    from lstm_export.common.errors import UserError
    known = {s.name: s for s in specs}
    for name, value in values.items():
        s = known.get(name)
        if s is None or len(s.shape) != 0:
            what = "has no input called that" if s is None else f"declares it {s.describe()}, not a scalar"
            raise UserError(f"--input-value {name}: the model {what}; --input-value fixes scalar inputs "
                            f"(its scalar inputs: {', '.join(x.name for x in specs if not x.shape) or 'none'})")
        keep = [v for v in model.graph.input if v.name != name]
        del model.graph.input[:]
        model.graph.input.extend(keep)
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=s.dtype), name))


def _drop_stale_shapes(model) -> None:
    """Clears the declared shapes of intermediate values and outputs: shape inference recomputes
    them from the inputs just fixed, and a stale declaration (an exporter's [1, -1] where the graph
    computes [20, 1, 8210]) must not survive as a constraint."""
    for v in [*model.graph.value_info, *model.graph.output]:
        if v.type.HasField("tensor_type"):
            v.type.tensor_type.ClearField("shape")


def _known_dims(graph, outer: dict | None = None) -> dict[str, list]:
    """Value name -> its dims (int, or None where symbolic), for every value shape inference typed
    in `graph`, over those of the graphs around it."""
    out = dict(outer or {})
    for v in [*graph.input, *graph.value_info, *graph.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in graph.initializer:
        out[init.name] = list(init.dims)
    return out


def _fold_static_shape_picks(model) -> int:
    """Replaces picks of static dims by constants, in place, in the graph and in the branches and
    bodies of its If/Loop/Scan nodes (exporters put whole models inside If branches); returns how many."""
    return _fold_graph(model, model.graph, {}, {})


def _fold_graph(model, g, outer_dims: dict, outer_consts: dict) -> int:
    from onnx import AttributeProto, helper, numpy_helper
    dims = _known_dims(g, outer_dims)
    consts = dict(outer_consts)  # a subgraph sees the constants of the graphs around it
    consts.update({i.name: numpy_helper.to_array(i) for i in g.initializer})
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    shapes = {}  # Shape output -> the dims it reports
    for n in g.node:
        if n.op_type == "Shape" and n.input[0] in dims:
            full = dims[n.input[0]]
            attrs = {a.name: a.i for a in n.attribute}
            start, end = attrs.get("start", 0), attrs.get("end", len(full))
            shapes[n.output[0]] = full[slice(start, end)]
    folded = {}  # node position -> its constant value (positions: protobuf hands out fresh wrappers)
    inner = 0
    for i, n in enumerate(g.node):
        if n.op_type == "Shape" and n.output[0] in shapes and None not in shapes[n.output[0]]:
            folded[i] = [np.array(shapes[n.output[0]], np.int64)]
        elif n.op_type == "Size" and n.input[0] in dims and None not in dims[n.input[0]]:
            folded[i] = [np.array(int(np.prod(dims[n.input[0]], dtype=np.int64)), np.int64)]
        elif n.op_type in ("Gather", "Slice") and n.input[0] in shapes and len(n.input) >= 2 + (n.op_type == "Slice") \
                and all(x in consts for x in n.input[1:] if x):
            picked = _pick(n, np.array(shapes[n.input[0]], dtype=object), consts)
            if picked is not None and not any(v is None for v in np.atleast_1d(picked)):
                folded[i] = [np.array(picked, np.int64)]
            elif picked is not None and np.ndim(picked) == 1:  # a slice still holding symbolic dims
                shapes[n.output[0]] = list(picked)
        elif n.op_type in FOLDABLE and n.domain in ("", "ai.onnx") and n.input \
                and all(x in consts for x in n.input if x):
            outs = _evaluate(model, n, consts)
            if outs is not None:
                folded[i] = outs
        for out, value in zip(g.node[i].output, folded.get(i, [])):
            consts[out] = value  # later nodes of the chain fold in the same pass
        for a in g.node[i].attribute:  # If branches, Loop and Scan bodies
            if a.type == AttributeProto.GRAPH:
                inner += _fold_graph(model, a.g, dims, consts)
    for i, values in sorted(folded.items(), reverse=True):
        node = g.node[i]
        g.node.remove(node)
        for k, (out, value) in enumerate(zip(node.output, values)):
            g.node.insert(i + k, helper.make_node("Constant", [], [out],
                                                  value=numpy_helper.from_array(np.asarray(value), out + "_folded")))
    return len(folded) + inner


def _pick(node, shape, consts):
    """Gather(shape, k) or Slice(shape, starts, ends[, axes, steps]) on an object array of dims
    (None where symbolic), or None for a form not handled (an axis other than 0)."""
    args = [consts[x].astype(np.int64) if x else None for x in node.input[1:]]
    if node.op_type == "Gather":
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        return np.take(shape, args[0]) if axis == 0 else None
    starts, ends = args[0], args[1]
    axes = args[2] if len(args) > 2 and args[2] is not None else np.zeros(1, np.int64)
    steps = args[3] if len(args) > 3 and args[3] is not None else np.ones(1, np.int64)
    if starts.size != 1 or axes.size != 1 or int(axes[0]) not in (0, -1):
        return None
    # Python's slice clamps out-of-range bounds as ONNX does, for either step sign
    return shape[slice(int(starts[0]), int(ends[0]), int(steps[0]))]


# shape arithmetic: cheap, deterministic ops whose results on constants are small
FOLDABLE = {"Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Max", "Min", "Cast", "Concat", "Unsqueeze", "Squeeze",
            "Reshape", "Slice", "Transpose", "ConstantOfShape", "Range", "Expand", "Equal", "Where", "Less",
            "Greater", "Not", "And", "Or", "Identity", "Floor", "Ceil", "Gather", "GatherElements", "Size",
            "Shape", "ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin", "Split", "Tile", "Pow", "Sqrt",
            "CastLike", "GreaterOrEqual", "LessOrEqual", "Sign", "Clip", "Round", "Flatten", "Reciprocal",
            "Xor", "Exp", "Log"}
MAX_FOLDED = 4096  # elements: no op here may turn a small constant into a large one


def _evaluate(model, node, consts) -> list | None:
    """The node's outputs on constant inputs (onnx's reference evaluator), or None if too large."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator
    names = list(dict.fromkeys(x for x in node.input if x))
    outputs = [helper.make_empty_tensor_value_info(o) for o in node.output]
    graph = helper.make_graph([node], "fold", [], outputs,
                              [numpy_helper.from_array(np.asarray(consts[x]), x) for x in names])
    try:
        outs = ReferenceEvaluator(helper.make_model(graph, opset_imports=model.opset_import)).run(None, {})
    except Exception:  # an op the evaluator cannot run here: leave it to TVM
        return None
    return outs if all(np.asarray(o).size <= MAX_FOLDED for o in outs) else None
