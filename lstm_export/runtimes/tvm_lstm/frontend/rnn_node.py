"""What the ONNX LSTM, GRU, RNN and Gather converters share: reading a node's inputs and
attributes into Relax terms (shapes, constants, strings, one direction of a [num_directions, ...]
input, the activations list) and the float16 convention around the recurrent ops.

It sits below every converter and imports none of them, so the converters import downward only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax

from lstm_export.common.errors import UserError

from ..kernels.recurrence import SUPPORTED_ACTIVATIONS


def static_shape(expr) -> list:
    """Dims as ints where known, None where symbolic."""
    shape = expr.ty.shape
    if shape is None:
        return []
    return [int(d.value) if hasattr(d, "value") else None for d in shape.values]  # IntImm or symbolic


def constant_value(expr) -> np.ndarray | None:
    """The value of a constant input (an initializer), or None for a computed one."""
    value = getattr(expr, "value", None) if expr is not None else None
    return value.numpy() if hasattr(value, "numpy") else None


def as_float32(bb, inputs: list) -> tuple[list, str | None]:
    """A float16 node's float inputs in float32, and "float16" to cast its outputs back to (else
    None): computed in float32 as ONNX Runtime does (its CPU provider has no float16 RNN kernels
    and casts around them). Constants are converted here, so they stay constants for packing."""
    x = inputs[0]
    if x is None or str(getattr(getattr(x.ty, "dtype", None), "dtype", "")) != "float16":
        return inputs, None
    out = []
    for v in inputs:
        value = constant_value(v) if v is not None else None
        if value is not None and value.dtype == np.float16:
            out.append(relax.const(value.astype(np.float32)))
        elif v is not None and str(getattr(getattr(v.ty, "dtype", None), "dtype", "")) == "float16":
            out.append(bb.emit(relax.op.astype(v, "float32")))
        else:
            out.append(v)  # absent, or sequence_lens
    return out, "float16"


def cast_back(bb, outputs: list, dtype: str | None):
    return relax.Tuple([bb.emit(relax.op.astype(o, dtype)) for o in outputs] if dtype else outputs)


def direction_slice(x, d: int):
    """x[d] for a constant d, as slice + squeeze (take with a constant index warns on every call)."""
    return relax.op.squeeze(relax.op.strided_slice(x, axes=[0], begin=[d], end=[d + 1]), [0])


def attribute_string(v):
    return v.decode() if isinstance(v, bytes) else v


def activation_triples(attr: dict, per_dir: int, num_dirs: int, defaults: tuple, op: str, node: str) -> list:
    """(name, alpha, beta) for every activation of every direction, from activations /
    activation_alpha / activation_beta (LSTM: f, g, h per direction; GRU: f, g; RNN: f)."""
    acts = [attribute_string(a) for a in attr.get("activations", ())] or list(defaults) * num_dirs
    if len(acts) != per_dir * num_dirs:
        raise UserError(f"{op} node {node!r}: activations lists {len(acts)} functions, expected "
                        f"{per_dir * num_dirs} ({per_dir} per direction)")
    for a in acts:
        if a.lower() not in {s.lower() for s in SUPPORTED_ACTIVATIONS}:
            raise UserError(f"{op} node {node!r}: activation {a!r} is not an ONNX RNN activation; "
                            f"use one of {', '.join(SUPPORTED_ACTIVATIONS)}")
    alphas, betas = list(attr.get("activation_alpha", ())), list(attr.get("activation_beta", ()))
    # alpha/beta are consumed in order by the activations that take them, as ONNX Runtime does.
    takes_alpha = {"affine", "leakyrelu", "thresholdedrelu", "scaledtanh", "hardsigmoid", "elu"}
    takes_beta = {"affine", "scaledtanh", "hardsigmoid"}
    triples = []
    for a in acts:
        alpha = alphas.pop(0) if a.lower() in takes_alpha and alphas else None
        beta = betas.pop(0) if a.lower() in takes_beta and betas else None
        triples.append((a, alpha, beta))
    return triples


def zero_where_empty(bb, state, lens):
    """state (B, H) with the rows of zero-length sequences set to 0: ONNX Runtime's Y_h and Y_c for
    sequence_lens 0 (the kernels keep the initial state there, which is right for every length but 0)."""
    ran = bb.emit(relax.op.expand_dims(relax.op.greater(lens, relax.const(0, "int32")), [1]))  # (B, 1)
    return bb.emit(relax.op.where(ran, state, relax.op.zeros_like(state)))


@dataclass
class RnnNode:
    """What the LSTM, GRU and RNN converters read alike from their node: its name, its inputs (float32,
    padded with None to the op's count; `back` casts outputs to the inputs' float type), direction and
    num_directions D, layout, hidden size H, and X as (T, B, I) with its static shape."""
    name: str
    inputs: list
    back: object
    direction: str
    D: int
    layout: int
    H: int
    X: object
    x_shape: list


def parse_rnn_node(bb, op: str, inputs, attr: dict, n_inputs: int, known: set[str]) -> RnnNode:
    """The checks every ONNX recurrent node gets, each a one-line UserError naming the node: known
    attributes, X/W/R present, direction, layout, hidden_size (else R's shape), X of rank 3. With
    layout 1, X is transposed to (T, B, I) here."""
    node = attr.get("tvm_custom", {}).get("name", op)
    unknown = set(attr) - known
    if unknown:
        raise UserError(f"{op} node {node!r}: unsupported attribute(s) {sorted(unknown)}")
    inputs, back = as_float32(bb, list(inputs) + [None] * (n_inputs - len(inputs)))
    X, W, R = inputs[:3]
    if X is None or W is None or R is None:
        raise UserError(f"{op} node {node!r}: inputs X, W and R are required")
    direction = attribute_string(attr.get("direction", "forward"))
    if direction not in ("forward", "reverse", "bidirectional"):
        raise UserError(f"{op} node {node!r}: direction {direction!r} is not forward, reverse or bidirectional")
    layout = int(attr.get("layout", 0))
    if layout not in (0, 1):
        raise UserError(f"{op} node {node!r}: layout {layout} must be 0 or 1")
    r_shape = static_shape(R)
    hidden = attr.get("hidden_size") or (r_shape[2] if len(r_shape) == 3 else None)
    if hidden is None:
        raise UserError(f"{op} node {node!r}: hidden_size is missing and R's shape is unknown")
    x_shape = static_shape(X)
    if layout == 1:
        X = bb.emit(relax.op.permute_dims(X, [1, 0, 2]))  # (T, B, I)
        x_shape = [x_shape[1], x_shape[0], x_shape[2]] if len(x_shape) == 3 else x_shape
    if len(x_shape) != 3:
        raise UserError(f"{op} node {node!r}: X must be 3-D, got rank {len(x_shape)}")
    w_shape = static_shape(W)
    if x_shape[2] is None and len(w_shape) == 3 and w_shape[2] is not None:
        # X's width is open and W says what it is, as ONNX Runtime takes it: a width of its own
        # for the kernels, checked on every call (a graph input is refused before: check_feeds)
        T_, B_ = X.ty.shape.values[:2]
        X = bb.match_cast(X, relax.TensorType([T_, B_, w_shape[2]], "float32"))
        x_shape = [x_shape[0], x_shape[1], w_shape[2]]
    return RnnNode(node, inputs, back, direction, 2 if direction == "bidirectional" else 1, layout, int(hidden),
                   X, x_shape)
