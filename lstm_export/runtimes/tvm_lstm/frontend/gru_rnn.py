"""Relax converters for the ONNX GRU and RNN operators (the whole spec, opset 7 on), the LSTM
converter's variants: the same parsing of directions, layout, activations and shapes, one GEMM for
every step's input projection, then a TIR time loop per direction (gru_rnn_loop.py).

With constant weights on a CPU target, GRU (both resets) and RNN run the LSTM's packed fast kernel
(cpu.py) with their own cell (cpu_cells.py); computed weights run the portable loop. On CUDA they
run a persistent kernel (cuda.py).
"""
from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from lstm_export.common.errors import UserError

from ..kernels.cpu_layer import DirectionIO, emit_cpu_layer
from ..kernels.gru_rnn_loop import LoopSpec, make_loop, schedule_loop
from ..kernels.marks import mark
from .convert_options import DEFAULT, ConvertOptions
from .rnn_node import (
    activation_triples,
    cast_back,
    constant_value,
    direction_slice,
    parse_rnn_node,
    static_shape,
    zero_where_empty,
)

KNOWN_ATTRS = {"hidden_size", "direction", "layout", "activations", "activation_alpha", "activation_beta",
               "clip", "linear_before_reset", "tvm_custom"}
DEFAULTS = {"GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
GATES = {"GRU": 3, "RNN": 1}


class GRU(onnx_frontend.OnnxOpConverter):
    """ONNX GRU -> input projection GEMM + the GRU loop per direction."""

    options = DEFAULT  # this import's (registry._bound)

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        return convert_rnn(bb, inputs, attr, "GRU", cls.options)

    @classmethod
    def _impl_v14(cls, bb, inputs, attr, params):
        return convert_rnn(bb, inputs, attr, "GRU", cls.options)


class RNN(GRU):
    """ONNX RNN -> input projection GEMM + the RNN loop per direction."""

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        return convert_rnn(bb, inputs, attr, "RNN", cls.options)

    @classmethod
    def _impl_v14(cls, bb, inputs, attr, params):
        return convert_rnn(bb, inputs, attr, "RNN", cls.options)


def _check_shape(got, want, what, op, node):
    if len(got) != len(want) or any(g not in (w, None) for g, w in zip(got, want)):
        raise UserError(f"{op} node {node!r}: {what} has shape {got}, expected {want}")


def convert_rnn(bb: relax.BlockBuilder, inputs, attr: dict, op: str, options: ConvertOptions = DEFAULT):
    node = attr.get("tvm_custom", {}).get("name", op)
    cuda, plan = options.cuda, options.plan
    if options.lowp is not None:  # GRU and RNN have no reduced-precision kernel
        raise UserError(f"{op} node {node!r}: --precision bf16 has a kernel for LSTM layers only; compile this "
                        "model at fp32 (the default)")
    parsed = parse_rnn_node(bb, op, inputs, attr, 6,
                            KNOWN_ATTRS if op == "GRU" else KNOWN_ATTRS - {"linear_before_reset"})
    back, D, G, layout, H, X, x_shape = (parsed.back, parsed.D, GATES[op], parsed.layout, parsed.H, parsed.X,
                                         parsed.x_shape)
    _, W, R, B, seq_lens, h0 = parsed.inputs[:6]
    direction, r_shape = parsed.direction, static_shape(R)
    _check_shape(static_shape(W), [D, G * H, x_shape[2]], "W", op, node)
    _check_shape(r_shape, [D, G * H, H], "R", op, node)
    if B is not None:
        _check_shape(static_shape(B), [D, 2 * G * H], "B", op, node)

    triples = activation_triples(attr, len(DEFAULTS[op]), D, DEFAULTS[op], op, node)
    clip = attr.get("clip")
    lbr = bool(attr.get("linear_before_reset", 0))
    n_t, n_b = X.ty.shape.values[0], X.ty.shape.values[1]
    if h0 is not None and layout == 1:
        h0 = bb.emit(relax.op.permute_dims(h0, [1, 0, 2]))  # (D, B, H)
    weights = [constant_value(v) if v is not None else None for v in (W, R, B)]
    fast = (plan is not None and x_shape[2] is not None
            and all(w is not None for w, v in zip(weights, (W, R, B)) if v is not None))
    if fast:  # the kernel starts from zero itself and ignores absent lengths: (1, ...) placeholders
        zeros = relax.const(np.zeros((1, H), np.float32)) if h0 is None else None
        lens = bb.emit(relax.op.astype(seq_lens, "int32")) if seq_lens is not None else \
            relax.const(np.zeros(1, np.int32))
    else:
        zeros = bb.emit(relax.op.zeros(relax.ShapeExpr([n_b, H]), "float32")) if h0 is None else None
        lens = bb.emit(relax.op.astype(seq_lens, "int32")) if seq_lens is not None else \
            bb.emit(relax.op.zeros(relax.ShapeExpr([n_b]), "int32"))  # ignored: every sequence runs all T

    ys, hs = [], []
    per_dir = len(DEFAULTS[op])
    for d in range(D):
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        spec = LoopSpec(op, H, tuple(triples[per_dir * d:per_dir * (d + 1)]), float(clip) if clip is not None else None,
                        reverse, seq_lens is not None, lbr)
        h_d = bb.emit(direction_slice(h0, d)) if h0 is not None else zeros
        if fast:
            io = DirectionIO(h_d, h_d, lens, n_t, n_b, has_state=h0 is not None)
            y, h = _fast_cpu_direction(bb, X, spec, [w[d] if w is not None else None for w in weights], io,
                                       int(x_shape[2]), plan)
            ys.append(y)
            hs.append(zero_where_empty(bb, h, lens) if seq_lens is not None else h)
            continue
        xw = bb.emit(relax.op.matmul(X, relax.op.permute_dims(bb.emit(direction_slice(W, d)), [1, 0])))  # (T, B, G*H)
        rbh = relax.const(np.zeros(H, np.float32))
        if B is not None:
            halves = bb.emit(relax.op.split(bb.emit(direction_slice(B, d)), 2, axis=0))  # Wb, Rb: (G*H,) each
            wb, rb = bb.emit(halves[0]), bb.emit(halves[1])
            if lbr:  # Rbh sits inside r (.) (Ht-1*Rh + Rbh): kept apart, the rest goes into the projection
                parts = bb.emit(relax.op.split(rb, [2 * H], axis=0))
                rb_zr, rbh = bb.emit(parts[0]), bb.emit(parts[1])
                rb = bb.emit(relax.op.concat([rb_zr, relax.op.zeros(relax.ShapeExpr([H]), "float32")], axis=0))
            xw = bb.emit(relax.op.add(xw, relax.op.add(wb, rb)))
        r_t = bb.emit(relax.op.permute_dims(direction_slice(R, d), [1, 0]))  # (H, G*H)
        if cuda:
            from ..kernels.cuda import make_cuda_loop
            func = make_cuda_loop(spec)
        else:
            func = schedule_loop(make_loop(spec))
        loop = bb.add_func(mark(func), f"{op.lower()}_loop_{'rev' if reverse else 'fwd'}")
        out = bb.emit(relax.call_tir(loop, [xw, r_t, rbh, h_d, lens],
                                     [relax.TensorType([n_t, n_b, H], "float32"),
                                      relax.TensorType([n_b, H], "float32")]))
        ys.append(bb.emit(relax.TupleGetItem(out, 0)))
        h = bb.emit(relax.TupleGetItem(out, 1))
        hs.append(zero_where_empty(bb, h, lens) if seq_lens is not None else h)
    if D == 1:
        Y = bb.emit(relax.op.reshape(ys[0], relax.ShapeExpr([n_t, 1, n_b, H])))  # (T, 1, B, H)
        Y_h = bb.emit(relax.op.reshape(hs[0], relax.ShapeExpr([1, n_b, H])))
    else:
        Y = bb.emit(relax.op.stack(ys, axis=1))  # (T, D, B, H)
        Y_h = bb.emit(relax.op.stack(hs, axis=0))  # (D, B, H)
    if layout == 1:
        Y = bb.emit(relax.op.permute_dims(Y, [2, 0, 1, 3]))  # (B, T, D, H)
        Y_h = bb.emit(relax.op.permute_dims(Y_h, [1, 0, 2]))  # (B, D, H)
    return cast_back(bb, [Y, Y_h], back)


def _fast_cpu_direction(bb, X, spec: LoopSpec, weights, io: DirectionIO, I: int, plan):
    """Constant weights on the CPU: the LSTM's packed kernel with this cell (cpu_cells.py), each of
    its passes' weights packed and concatenated in pass order."""
    from ..kernels import packing
    H, lanes = spec.hidden, plan.lanes
    w, r, b = weights
    if spec.kind == "GRU" and spec.linear_before_reset:
        parts = [packing.gru_as_gates(w, r, b, H)]
    elif spec.kind == "GRU":
        parts = packing.gru0_as_passes(w, r, b, H)
    else:
        parts = [packing.rnn_as_gates(w, r, b, H)]
    packed = [np.concatenate([packing.pack_gates(w4, w4.shape[0] // 4, lanes) for w4, _, _ in parts]),
              np.concatenate([packing.pack_bias(b4, b4.shape[0] // 4, lanes) for _, _, b4 in parts]),
              np.concatenate([packing.pack_gates(r4, r4.shape[0] // 4, lanes) for _, r4, _ in parts])]
    no_peepholes = relax.const(np.zeros((3, 1), np.float32))
    y, h, _ = emit_cpu_layer(bb, spec, I, plan, io.has_state, False,
                             [X, *(relax.const(a) for a in packed), no_peepholes, io.h0, io.c0, io.lens],
                             io.n_t, io.n_b)
    return y, h
