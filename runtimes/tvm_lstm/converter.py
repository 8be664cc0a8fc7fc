"""A Relax converter for the ONNX LSTM operator (the whole spec, opset 7 on), and the import path
that registers it with TVM's ONNX frontend without editing TVM's files.

Follows the frontend's pattern: a class with `_impl_vN` class methods chosen by opset, called
with (bb, inputs, attr, params); inputs absent from the node arrive as None.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading

import numpy as np
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend

from common.errors import UserError

from .marks import mark
from .recurrence import SUPPORTED_ACTIVATIONS, CellSpec, make_recurrence

DEFAULT_ACTIVATIONS = ("Sigmoid", "Tanh", "Tanh")
KNOWN_ATTRS = {"hidden_size", "direction", "layout", "activations", "activation_alpha", "activation_beta",
               "clip", "input_forget", "tvm_custom"}


def _static_shape(expr) -> list:
    """Dims as ints where known, None where symbolic."""
    shape = expr.ty.shape
    if shape is None:
        return []
    return [int(d.value) if hasattr(d, "value") else None for d in shape.values]  # IntImm or symbolic


def _const(expr) -> np.ndarray | None:
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
        value = _const(v) if v is not None else None
        if value is not None and value.dtype == np.float16:
            out.append(relax.const(value.astype(np.float32)))
        elif v is not None and str(getattr(getattr(v.ty, "dtype", None), "dtype", "")) == "float16":
            out.append(bb.emit(relax.op.astype(v, "float32")))
        else:
            out.append(v)  # absent, or sequence_lens
    return out, "float16"


def cast_back(bb, outputs: list, dtype: str | None):
    return relax.Tuple([bb.emit(relax.op.astype(o, dtype)) for o in outputs] if dtype else outputs)


def _direction(x, d: int):
    """x[d] for a constant d, as slice + squeeze (take with a constant index warns on every call)."""
    return relax.op.squeeze(relax.op.strided_slice(x, axes=[0], begin=[d], end=[d + 1]), [0])


def _decode(v):
    return v.decode() if isinstance(v, bytes) else v


def activation_triples(attr: dict, per_dir: int, num_dirs: int, defaults: tuple, op: str, node: str) -> list:
    """(name, alpha, beta) for every activation of every direction, from activations /
    activation_alpha / activation_beta (LSTM: f, g, h per direction; GRU: f, g; RNN: f)."""
    acts = [_decode(a) for a in attr.get("activations", ())] or list(defaults) * num_dirs
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


def _cell_specs(attr: dict, hidden: int, num_dirs: int, node: str, has_lens: bool) -> list[CellSpec]:
    """One CellSpec per direction from activations / alpha / beta / clip / input_forget."""
    triples = activation_triples(attr, 3, num_dirs, DEFAULT_ACTIVATIONS, "LSTM", node)
    clip = attr.get("clip")
    direction = _decode(attr.get("direction", "forward"))
    specs = []
    for d in range(num_dirs):
        f, g, h = triples[3 * d:3 * d + 3]
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        specs.append(CellSpec(hidden, f, g, h, float(clip) if clip is not None else None,
                              bool(attr.get("input_forget", 0)), reverse, has_lens))
    return specs


class LSTM(onnx_frontend.OnnxOpConverter):
    """ONNX LSTM -> one GEMM for every step's input projection, then a TIR time loop per direction."""

    cuda = False  # emit the persistent CUDA kernel instead of the CPU loop
    plan = None  # the CPU kernel's KernelPlan (cpu_plan); None: no fast CPU kernel (CUDA)

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        return convert_lstm(bb, inputs, attr, cls.cuda, cls.plan)

    @classmethod
    def _impl_v14(cls, bb, inputs, attr, params):
        return convert_lstm(bb, inputs, attr, cls.cuda, cls.plan)


def convert_lstm(bb: relax.BlockBuilder, inputs, attr: dict, cuda: bool = False, plan=None):
    node = attr.get("tvm_custom", {}).get("name", "LSTM")
    unknown = set(attr) - KNOWN_ATTRS
    if unknown:
        raise UserError(f"LSTM node {node!r}: unsupported attribute(s) {sorted(unknown)}")
    inputs, back = as_float32(bb, list(inputs) + [None] * (8 - len(inputs)))
    X, W, R, B, seq_lens, h0, c0, P = inputs[:8]
    if X is None or W is None or R is None:
        raise UserError(f"LSTM node {node!r}: inputs X, W and R are required")
    direction = _decode(attr.get("direction", "forward"))
    if direction not in ("forward", "reverse", "bidirectional"):
        raise UserError(f"LSTM node {node!r}: direction {direction!r} is not forward, reverse or bidirectional")
    D = 2 if direction == "bidirectional" else 1
    layout = int(attr.get("layout", 0))
    if layout not in (0, 1):
        raise UserError(f"LSTM node {node!r}: layout {layout} must be 0 or 1")

    w_shape, r_shape = _static_shape(W), _static_shape(R)
    hidden = attr.get("hidden_size") or (r_shape[2] if len(r_shape) == 3 else None)
    if hidden is None:
        raise UserError(f"LSTM node {node!r}: hidden_size is missing and R's shape is unknown")
    H = int(hidden)
    x_shape = _static_shape(X)
    if layout == 1:
        X = bb.emit(relax.op.permute_dims(X, [1, 0, 2]))  # (T, B, I)
        x_shape = [x_shape[1], x_shape[0], x_shape[2]] if len(x_shape) == 3 else x_shape
    if len(x_shape) != 3:
        raise UserError(f"LSTM node {node!r}: X must be 3-D, got rank {len(x_shape)}")
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
    if B is not None and _static_shape(B) not in ([D, 8 * H], [None, 8 * H], [D, None], [None, None]):
        raise UserError(f"LSTM node {node!r}: B has shape {_static_shape(B)}, expected [{D}, {8 * H}]")
    if P is not None and _static_shape(P) not in ([D, 3 * H], [None, 3 * H]):
        raise UserError(f"LSTM node {node!r}: P has shape {_static_shape(P)}, expected [{D}, {3 * H}]")

    specs = _cell_specs(attr, H, D, node, seq_lens is not None)
    shape = X.ty.shape.values  # (T, B, I) symbolic or static
    n_t, n_b = shape[0], shape[1]
    if h0 is not None and layout == 1:
        h0 = bb.emit(relax.op.permute_dims(h0, [1, 0, 2]))  # (D, B, H)
    if c0 is not None and layout == 1:
        c0 = bb.emit(relax.op.permute_dims(c0, [1, 0, 2]))
    weights = [_const(W), _const(R)] + [_const(v) for v in (B, P) if v is not None]
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
        h_d = bb.emit(_direction(h0, d)) if h0 is not None else zeros_state
        c_d = bb.emit(_direction(c0, d)) if c0 is not None else zeros_state
        if fast_cpu and h_d is None:  # no initial state: (1, H) placeholders the kernel never reads
            h_d = c_d = relax.const(np.zeros((1, H), np.float32))
        if fast_cpu:  # constant weights: packed once here, at import time
            y, h, c = _fast_cpu_direction(bb, X, d, spec, weights, B is not None, P is not None,
                                          h0 is not None or c0 is not None, h_d, c_d, lens, n_t, n_b, I, plan)
        else:
            y, h, c = _generic_direction(bb, X, W, R, B, P, d, spec, h_d, c_d, lens, n_t, n_b, cuda)
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


def _generic_direction(bb, X, W, R, B, P, d, spec, h_d, c_d, lens, n_t, n_b, cuda):
    """Any weights (constant or computed): a Relax GEMM, then the portable (or CUDA) time loop."""
    H = spec.hidden
    w_d = bb.emit(_direction(W, d))  # (4H, I)
    xw = bb.emit(relax.op.matmul(X, relax.op.permute_dims(w_d, [1, 0])))  # (T, B, 4H): all steps, one GEMM
    if B is not None:
        b_d = bb.emit(_direction(B, d))  # (8H,) = [Wb; Rb]
        halves = relax.op.split(b_d, 2, axis=0)
        xw = bb.emit(relax.op.add(xw, relax.op.add(halves[0], halves[1])))
    r_t = bb.emit(relax.op.permute_dims(_direction(R, d), [1, 0]))  # (H, 4H)
    p_d = bb.emit(_direction(P, d)) if P is not None else relax.const(np.zeros(3 * H, np.float32))
    if cuda:
        from .cuda import make_cuda_recurrence
        func = make_cuda_recurrence(spec)
    else:
        func = make_recurrence(spec)
    gvar = bb.add_func(mark(func), f"lstm_recurrence_{'rev' if spec.reverse else 'fwd'}")
    out = bb.emit(relax.call_tir(gvar, [xw, r_t, p_d, h_d, c_d, lens],
                                 [relax.TensorType([n_t, n_b, H], "float32"), relax.TensorType([n_b, H], "float32"),
                                  relax.TensorType([n_b, H], "float32")]))
    return tuple(bb.emit(relax.TupleGetItem(out, i)) for i in range(3))


def _fast_cpu_direction(bb, X, d, spec, weights, has_b, has_p, has_state, h_d, c_d, lens, n_t, n_b, I, plan):
    """Constant weights on the CPU: packed projection GEMM + fused recurrent step (see cpu.py)."""
    from . import packing
    H, lanes = spec.hidden, plan.lanes
    HP = packing.padded(H, lanes)
    w, r = weights[0][d], weights[1][d]
    bias = weights[2][d][:4 * H] + weights[2][d][4 * H:] if has_b else np.zeros(4 * H, np.float32)
    p = np.zeros((3, HP), np.float32)
    if has_p:
        p[:, :H] = weights[-1][d].reshape(3, H)
    packed = (packing.pack_gates(w, H, lanes), packing.pack_bias(bias, H, lanes), packing.pack_gates(r, H, lanes), p)
    return emit_cpu_layer(bb, spec, int(I), plan, has_state, has_p,
                          [X, *(relax.const(a) for a in packed), h_d, c_d, lens], n_t, n_b)


@functools.lru_cache(maxsize=16)  # built once for both directions, and for a layer compiled again
def _cpu_layer(spec, k_dim: int, plan, has_state: bool, has_peepholes: bool):
    from .cpu import make_cpu_layer
    return make_cpu_layer(spec, k_dim, plan, has_state=has_state, has_peepholes=has_peepholes)


def emit_cpu_layer(bb, spec, k_dim: int, plan, has_state: bool, has_peepholes: bool, args, n_t, n_b):
    """Calls the fast CPU kernel (cpu.make_cpu_layer) on args (x, packed weights, peepholes, h0, c0,
    lens) -> (y, hn, cn). Both directions of a layer build the same function, which the BlockBuilder
    adds once; the direction is its scalar argument."""
    func = _cpu_layer(dataclasses.replace(spec, reverse=False), k_dim, plan, has_state, has_peepholes)
    layer = bb.add_func(mark(func), f"{getattr(spec, 'kind', 'LSTM').lower()}_layer_cpu")
    y, state = relax.TensorType([n_t, n_b, spec.hidden], "float32"), relax.TensorType([n_b, spec.hidden], "float32")
    out = bb.emit(relax.call_tir(layer, [*args, tirx.IntImm("int64", int(spec.reverse))],
                                 [y, state, state]))
    return tuple(bb.emit(relax.TupleGetItem(out, i)) for i in range(3))


@contextlib.contextmanager
def lstm_registered(cuda: bool = False, plan=None):
    """Within this block TVM's ONNX importer knows LSTM, GRU and RNN, and its Gather, GatherElements and
    GatherND check indices on the CPU (safe_gather.py); TVM's files are not touched. CPU kernels are
    laid out by `plan` (a cpu_plan.KernelPlan; None: the portable TIR loop only).

    TVM 0.27 takes no converter table from the caller, so the block swaps the frontend's table
    getter; the lock makes imports in other threads wait instead of seeing another block's plan."""
    from .gru_rnn import GRU, RNN
    from .safe_gather import SafeGather, SafeGatherElements, SafeGatherND
    converter = type("LSTM", (LSTM,), {"cuda": cuda, "plan": plan})
    gathers = {c.__name__[4:]: type(c.__name__[4:], (c,), {"cuda": cuda})
               for c in (SafeGather, SafeGatherElements, SafeGatherND)}
    gru, rnn = (type(c.__name__, (c,), {"cuda": cuda, "plan": plan}) for c in (GRU, RNN))
    with _CONVERT_MAP_LOCK:
        original = onnx_frontend._get_convert_map

        def with_lstm():
            table = dict(original())
            table.update(gathers, LSTM=converter, GRU=gru, RNN=rnn)
            return table

        onnx_frontend._get_convert_map = with_lstm
        try:
            yield
        finally:
            onnx_frontend._get_convert_map = original


_CONVERT_MAP_LOCK = threading.RLock()
