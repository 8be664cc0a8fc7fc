"""Gather, GatherElements and GatherND that check their indices inside the compiled artifact.

TVM's `take` runs in "fast" mode: an index outside the table reads past it (garbage, exit 0) or
crashes the process (exit 139); `gather_elements` and `gather_nd` do not check either. Our
converters, where the extents an index reads along are known at compile time, first pass the
indices through a small TIR kernel that asserts each is in [-n, n) (n: the extent its position
reads: the axis for Gather and GatherElements, data dim batch_dims + p for coordinate p of a
GatherND index) and copies it; the assertion is compiled into model.so, so the artifact refuses a
bad index with an error naming the node even when loaded with the TVM runtime alone, in any host
program. CPU (llvm) only: a TIR assert cannot run inside a CUDA kernel.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from lstm_export.common.errors import UserError

from ..kernels.marks import mark
from .convert_options import DEFAULT
from .rnn_node import static_shape


def _extent(data, axis: int) -> int | None:
    shape = getattr(getattr(data, "ty", None), "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not -len(values) <= axis < len(values):
        return None
    dim = values[axis]
    return int(dim.value) if hasattr(dim, "value") else None


def index_check(bounds, dtype: str, node: str, op: str = "Gather"):
    """A PrimFunc (m,) -> (m,): copies flat indices, asserting index j in [-n, n) for n =
    bounds[j % len(bounds)] (an int: one bound for all)."""
    from tvm import tirx
    from tvm.script import tirx as T
    bounds = (bounds,) if isinstance(bounds, int) else tuple(bounds)
    if len(bounds) == 1:
        n = bounds[0]
        msg = (f"{op} node {node!r}: an index is outside [-{n}, {n}), the rows of the table it reads; "
               "check the ids given to the model")
    else:
        msg = (f"{op} node {node!r}: an index is outside the extent of the data dimension it reads "
               f"({', '.join(map(str, bounds))}); check the indices given to the model")

    def bound(j):  # bounds[j % k] as an expression of the flat position j
        e = tirx.const(bounds[-1], dtype)
        for p in reversed(range(len(bounds) - 1)):
            e = tirx.Select(j % len(bounds) == p, tirx.const(bounds[p], dtype), e)
        return e

    # The clamp after the assertion never changes a value that passed it; it keeps the kernel from
    # being a plain copy, which Relax would rewrite into a reshape and drop, assertion and all.
    @T.prim_func(private=True, s_tir=True)
    def lstm_export_index_check(var_i: T.handle, var_o: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True})  # opaque: Relax neither fuses nor inspects it
        m = T.int64()
        idx = T.match_buffer(var_i, (m,), dtype)
        out = T.match_buffer(var_o, (m,), dtype)
        with T.sblock("root"):
            for j in T.serial(m):
                with T.sblock("check"):
                    vj = T.axis.spatial(m, j)
                    assert -bound(vj) <= idx[vj] and idx[vj] < bound(vj), msg
                    out[vj] = T.max(T.min(idx[vj], bound(vj) - T.Cast(dtype, 1)), -bound(vj))

    return lstm_export_index_check


def checked_indices(bb, indices, bounds, node: str, op: str):
    """indices passed through index_check (same shape), or None where it cannot apply (a constant,
    folded and checked at import; an unknown shape; not an integer tensor)."""
    ty = getattr(indices, "ty", None)
    shape = getattr(ty, "shape", None)
    dtype = str(getattr(getattr(ty, "dtype", None), "dtype", ""))
    if isinstance(indices, tvm.ir.GenericConst) or shape is None or not dtype.startswith("int"):
        return None
    flat = bb.emit(relax.op.reshape(indices, [-1]))
    kernel = bb.add_func(mark(index_check(bounds, dtype, node, op)), "lstm_export_index_check")
    checked = bb.emit(relax.call_tir(kernel, [flat], relax.TensorType(flat.ty.shape, dtype)))
    return bb.emit(relax.op.reshape(checked, shape))


class SafeGather(onnx_frontend.Gather):
    """TVM's Gather with its indices checked first (see the module docstring)."""

    options = DEFAULT  # this import's (registry._bound)

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, indices = inputs[0], inputs[1]
        axis = attr.get("axis", 0)
        n = None if cls.options.cuda or isinstance(data, relax.ShapeExpr) else _extent(data, axis)
        checked = None if n is None else checked_indices(bb, indices, n, _name(attr, "Gather"), "Gather")
        if checked is None:
            return super()._impl_v13(bb, inputs, attr, params)
        # as TVM's Gather from here (negative indices counted from the end), but `take` in clip
        # mode: the indices are in range, and fast mode only adds a warning at every compile
        extent = onnx_frontend._axis_extent(bb, data, axis, checked.ty.dtype.dtype)
        return relax.op.take(data, onnx_frontend._normalize_negative_indices(bb, checked, extent), axis, mode="clip")


class SafeGatherElements(onnx_frontend.GatherElements):
    """TVM's GatherElements with its indices checked first; index dims that exceed the data's off
    the axis (known at import) are refused there."""

    options = DEFAULT  # this import's (registry._bound)

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, indices = inputs[0], inputs[1]
        axis, node = attr.get("axis", 0), _name(attr, "GatherElements")
        dd, di = static_shape(data), static_shape(indices)
        if dd and di:  # both ranks known
            if len(dd) != len(di):
                raise UserError(f"GatherElements node {node!r}: indices have rank {len(di)}, data {len(dd)}; "
                                "they must be equal")
            for k, (a, b) in enumerate(zip(dd, di)):
                if k != axis % len(dd) and a is not None and b is not None and b > a:
                    raise UserError(f"GatherElements node {node!r}: indices dim {k} is {b}, past data's {a}")
        n = None if cls.options.cuda else _extent(data, axis)
        checked = None if n is None else checked_indices(bb, indices, n, node, "GatherElements")
        return super()._impl_v13(bb, [data, checked if checked is not None else indices], attr, params)


class SafeGatherND(onnx_frontend.GatherND):
    """TVM's GatherND with each coordinate of each index checked against the data dim it reads."""

    options = DEFAULT  # this import's (registry._bound)

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, indices = inputs[0], inputs[1]
        batch_dims = attr.get("batch_dims", 0)
        dd, di = static_shape(data), static_shape(indices)
        bounds = None
        if not cls.options.cuda and dd and di and di[-1] is not None and batch_dims + di[-1] <= len(dd):
            bounds = dd[batch_dims:batch_dims + di[-1]]
        checked = None
        if bounds and all(b is not None for b in bounds):
            checked = checked_indices(bb, indices, bounds, _name(attr, "GatherND"), "GatherND")
        return super()._impl_v13(bb, [data, checked if checked is not None else indices], attr, params)


def _name(attr: dict, op: str) -> str:
    return attr.get("tvm_custom", {}).get("name") or op
