"""A Relax converter for the ONNX LSTM operator (the whole spec, opset 7 on); registry.py registers
it with TVM's ONNX frontend for an import.

Follows the frontend's pattern: a class with `_impl_vN` class methods chosen by opset, called
with (bb, inputs, attr, params); inputs absent from the node arrive as None.
"""
from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from lstm_export.common.errors import UserError

from ..kernels.cpu_layer import DirectionIO, emit_cpu_layer
from ..kernels.marks import mark
from ..kernels.recurrence import CellSpec, make_recurrence
from .convert_options import DEFAULT, ConvertOptions
from .rnn_node import (
    activation_triples,
    attribute_string,
    cast_back,
    constant_value,
    direction_slice,
    parse_rnn_node,
    static_shape,
    zero_where_empty,
)

DEFAULT_ACTIVATIONS = ("Sigmoid", "Tanh", "Tanh")
KNOWN_ATTRS = {"hidden_size", "direction", "layout", "activations", "activation_alpha", "activation_beta",
               "clip", "input_forget", "tvm_custom"}


def _cell_specs(attr: dict, hidden: int, num_dirs: int, node: str, has_lens: bool) -> list[CellSpec]:
    """One CellSpec per direction from activations / alpha / beta / clip / input_forget."""
    triples = activation_triples(attr, 3, num_dirs, DEFAULT_ACTIVATIONS, "LSTM", node)
    clip = attr.get("clip")
    direction = attribute_string(attr.get("direction", "forward"))
    specs = []
    for d in range(num_dirs):
        f, g, h = triples[3 * d:3 * d + 3]
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        specs.append(CellSpec(hidden, f, g, h, float(clip) if clip is not None else None,
                              bool(attr.get("input_forget", 0)), reverse, has_lens))
    return specs


class LSTM(onnx_frontend.OnnxOpConverter):
    """ONNX LSTM -> one GEMM for every step's input projection, then a TIR time loop per direction."""

    options = DEFAULT  # this import's (registry._bound)

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        return convert_lstm(bb, inputs, attr, cls.options)

    @classmethod
    def _impl_v14(cls, bb, inputs, attr, params):
        return convert_lstm(bb, inputs, attr, cls.options)


def convert_lstm(bb: relax.BlockBuilder, inputs, attr: dict, options: ConvertOptions = DEFAULT):
    cuda, plan, lowp = options.cuda, options.plan, options.lowp
    parsed = parse_rnn_node(bb, "LSTM", inputs, attr, 8, KNOWN_ATTRS)
    node, back, D, layout, H, X, x_shape = (parsed.name, parsed.back, parsed.D, parsed.layout, parsed.H, parsed.X,
                                            parsed.x_shape)
    _, W, R, B, seq_lens, h0, c0, P = parsed.inputs[:8]
    w_shape, r_shape = static_shape(W), static_shape(R)
    I = x_shape[2]
    if (
        len(w_shape) != 3
        or w_shape[0] not in (D, None)
        or w_shape[1] not in (4 * H, None)
        or w_shape[2] not in (I, None)
    ):
        raise UserError(f"LSTM node {node!r}: W has shape {w_shape}, expected [num_directions={D}, 4*hidden_size="
                        f"{4 * H}, input_size={I}]")
    if len(r_shape) != 3 or r_shape[0] not in (D, None) or r_shape[1] not in (4 * H, None) \
            or r_shape[2] not in (H, None):
        raise UserError(f"LSTM node {node!r}: R has shape {r_shape}, expected [num_directions={D}, "
                        f"4*hidden_size={4 * H}, hidden_size={H}]")
    if B is not None and static_shape(B) not in ([D, 8 * H], [None, 8 * H], [D, None], [None, None]):
        raise UserError(f"LSTM node {node!r}: B has shape {static_shape(B)}, expected [{D}, {8 * H}]")
    if P is not None and static_shape(P) not in ([D, 3 * H], [None, 3 * H]):
        raise UserError(f"LSTM node {node!r}: P has shape {static_shape(P)}, expected [{D}, {3 * H}]")

    specs = _cell_specs(attr, H, D, node, seq_lens is not None)
    shape = X.ty.shape.values  # (T, B, I) symbolic or static
    n_t, n_b = shape[0], shape[1]
    if h0 is not None and layout == 1:
        h0 = bb.emit(relax.op.permute_dims(h0, [1, 0, 2]))  # (D, B, H)
    if c0 is not None and layout == 1:
        c0 = bb.emit(relax.op.permute_dims(c0, [1, 0, 2]))
    weights = [constant_value(W), constant_value(R)] + [constant_value(v) for v in (B, P) if v is not None]
    fast_cpu = not cuda and plan is not None and I is not None and all(w is not None for w in weights)
    # The fast CPU kernel starts from zero itself and ignores absent lengths: no kernels for those.
    need_zeros = (h0 is None or c0 is None) and not (fast_cpu and h0 is None and c0 is None)
    zeros_state = bb.emit(relax.op.zeros(relax.ShapeExpr([n_b, H]), "float32")) if need_zeros else None
    if seq_lens is not None:
        lens = bb.emit(relax.op.astype(seq_lens, "int32"))
    elif fast_cpu:
        lens = relax.const(np.zeros(1, np.int32))
    else:  # every sequence runs all T steps; the portable loop ignores the (zero) lens tensor
        lens = bb.emit(relax.op.zeros(relax.ShapeExpr([n_b]), "int32"))

    ys, hs, cs = [], [], []
    for d, spec in enumerate(specs):
        h_d = bb.emit(direction_slice(h0, d)) if h0 is not None else zeros_state
        c_d = bb.emit(direction_slice(c0, d)) if c0 is not None else zeros_state
        if fast_cpu and h_d is None:  # no initial state: (1, H) placeholders the kernel never reads
            h_d = c_d = relax.const(np.zeros((1, H), np.float32))
        io = DirectionIO(h_d, c_d, lens, n_t, n_b, has_state=h0 is not None or c0 is not None)
        if fast_cpu:  # constant weights: packed once here, at import time
            consts = (weights[0][d], weights[1][d], _bias(weights, d, H, B is not None),
                      weights[-1][d] if P is not None else None)  # W (4H, I), R (4H, H), Wb + Rb (4H,), P (3H,)
            y, h, c = _fast_cpu_direction(bb, X, spec, consts, io, int(I), options)
        elif lowp is not None:
            raise UserError(f"LSTM node {node!r}: --precision bf16 needs constant weights and a static input "
                            "size (this node computes them, or leaves I open): compile it at fp32 (the default)")
        else:
            y, h, c = _generic_direction(bb, X, (W, R, B, P), d, spec, io, cuda)
        if seq_lens is not None:
            h, c = zero_where_empty(bb, h, lens), zero_where_empty(bb, c, lens)
        ys.append(y)
        hs.append(h)
        cs.append(c)
    if D == 1:  # a reshape is free; stack would copy
        Y = bb.emit(relax.op.reshape(ys[0], relax.ShapeExpr([n_t, 1, n_b, H])))  # (T, 1, B, H)
        Y_h = bb.emit(relax.op.reshape(hs[0], relax.ShapeExpr([1, n_b, H])))
        Y_c = bb.emit(relax.op.reshape(cs[0], relax.ShapeExpr([1, n_b, H])))
    else:
        Y = bb.emit(relax.op.stack(ys, axis=1))  # (T, D, B, H)
        Y_h = bb.emit(relax.op.stack(hs, axis=0))  # (D, B, H)
        Y_c = bb.emit(relax.op.stack(cs, axis=0))
    if layout == 1:
        Y = bb.emit(relax.op.permute_dims(Y, [2, 0, 1, 3]))  # (B, T, D, H)
        Y_h = bb.emit(relax.op.permute_dims(Y_h, [1, 0, 2]))  # (B, D, H)
        Y_c = bb.emit(relax.op.permute_dims(Y_c, [1, 0, 2]))
    return cast_back(bb, [Y, Y_h, Y_c], back)


def _generic_direction(bb, X, node_weights, d: int, spec: CellSpec, io: DirectionIO, cuda: bool):
    """Any weights (constant or computed): a Relax GEMM, then the portable (or CUDA) time loop.
    node_weights: the node's W, R, B, P (B, P or None), direction d taken here."""
    W, R, B, P = node_weights
    H, n_t, n_b = spec.hidden, io.n_t, io.n_b
    w_d = bb.emit(direction_slice(W, d))  # (4H, I)
    xw = bb.emit(relax.op.matmul(X, relax.op.permute_dims(w_d, [1, 0])))  # (T, B, 4H): all steps, one GEMM
    if B is not None:
        b_d = bb.emit(direction_slice(B, d))  # (8H,) = [Wb; Rb]
        halves = relax.op.split(b_d, 2, axis=0)
        xw = bb.emit(relax.op.add(xw, relax.op.add(halves[0], halves[1])))
    r_t = bb.emit(relax.op.permute_dims(direction_slice(R, d), [1, 0]))  # (H, 4H)
    p_d = bb.emit(direction_slice(P, d)) if P is not None else relax.const(np.zeros(3 * H, np.float32))
    if cuda:
        from ..kernels.cuda import make_cuda_recurrence
        func = make_cuda_recurrence(spec)
    else:
        func = make_recurrence(spec)
    gvar = bb.add_func(mark(func), f"lstm_recurrence_{'rev' if spec.reverse else 'fwd'}")
    out = bb.emit(relax.call_tir(gvar, [xw, r_t, p_d, io.h0, io.c0, io.lens],
                                 [relax.TensorType([n_t, n_b, H], "float32"), relax.TensorType([n_b, H], "float32"),
                                  relax.TensorType([n_b, H], "float32")]))
    return tuple(bb.emit(relax.TupleGetItem(out, i)) for i in range(3))


def _fast_cpu_direction(bb, X, spec: CellSpec, consts, io: DirectionIO, I: int, options: ConvertOptions):
    """Constant weights on the CPU: packed projection GEMM + fused recurrent step (see cpu.py), or
    the reduced-precision layer (kernels/lowp) with options.lowp. consts: this direction's W (4H, I),
    R (4H, H), Wb + Rb (4H,) and P (3H,) or None, in ONNX order."""
    if options.lowp is not None:
        from ..kernels.lowp.layer import emit_lowp_direction
        return emit_lowp_direction(bb, X, spec, consts, io, I, options.lowp)
    from ..kernels import packing
    w, r, bias, peep = consts
    H, lanes = spec.hidden, options.plan.lanes
    p = np.zeros((3, packing.padded(H, lanes)), np.float32)
    if peep is not None:
        p[:, :H] = peep.reshape(3, H)
    packed = (packing.pack_gates(w, H, lanes), packing.pack_bias(bias, H, lanes), packing.pack_gates(r, H, lanes), p)
    return emit_cpu_layer(bb, spec, I, options.plan, io.has_state, peep is not None,
                          [X, *(relax.const(a) for a in packed), io.h0, io.c0, io.lens], io.n_t, io.n_b)


def _bias(weights, d, H, has_b):
    """Wb + Rb of direction d, (4H,) float32 (zeros without B)."""
    return weights[2][d][:4 * H] + weights[2][d][4 * H:] if has_b else np.zeros(4 * H, np.float32)
