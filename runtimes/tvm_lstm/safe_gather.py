"""Gather that checks its indices inside the compiled artifact.

TVM's `take` runs in "fast" mode: an index outside the table reads past it (garbage, exit 0) or
crashes the process (exit 139). Our Gather converter, for a table whose extent along the axis is
known at compile time, first passes the indices through a small TIR kernel that asserts each is in
[-n, n) and copies it; the assertion is compiled into model.so, so the artifact refuses a bad index
with an error naming the node even when loaded with the TVM runtime alone, in any host program.
CPU (llvm) only: a TIR assert cannot run inside a CUDA kernel.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from .marks import mark


def _extent(data, axis: int) -> int | None:
    shape = getattr(getattr(data, "ty", None), "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not -len(values) <= axis < len(values):
        return None
    dim = values[axis]
    return int(dim.value) if hasattr(dim, "value") else None


def index_check(n: int, dtype: str, node: str):
    """A PrimFunc (m,) -> (m,): copies indices, asserting each in [-n, n)."""
    from tvm.script import tirx as T
    msg = (f"Gather node {node!r}: an index is outside [-{n}, {n}), the rows of the table it reads; "
           "check the ids given to the model")

    lo, hi = T.Cast(dtype, -n), T.Cast(dtype, n - 1)

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
                    assert lo <= idx[vj] and idx[vj] <= hi, msg
                    out[vj] = T.max(T.min(idx[vj], hi), lo)

    return lstm_export_index_check


class SafeGather(onnx_frontend.Gather):
    """TVM's Gather with its indices checked first (see the module docstring)."""

    cuda = False

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, indices = inputs[0], inputs[1]
        axis = attr.get("axis", 0)
        constant = isinstance(indices, tvm.ir.GenericConst)  # folded at import: checked by numpy there
        n = None if cls.cuda or constant or isinstance(data, relax.ShapeExpr) else _extent(data, axis)
        ty = getattr(indices, "ty", None)
        shape = getattr(ty, "shape", None)
        dtype = str(getattr(getattr(ty, "dtype", None), "dtype", ""))
        if n is None or shape is None or not dtype.startswith("int"):
            return super()._impl_v13(bb, inputs, attr, params)
        name = attr.get("tvm_custom", {}).get("name") or "Gather"
        flat = bb.emit(relax.op.reshape(indices, [-1]))
        kernel = bb.add_func(mark(index_check(n, dtype, name)), "lstm_export_index_check")
        checked = bb.emit(relax.call_tir(kernel, [flat], relax.TensorType(flat.ty.shape, dtype)))
        checked = bb.emit(relax.op.reshape(checked, shape))
        # as TVM's Gather from here (negative indices counted from the end), but `take` in clip
        # mode: the indices are in range, and fast mode only adds a warning at every compile
        extent = onnx_frontend._axis_extent(bb, data, axis, dtype)
        return relax.op.take(data, onnx_frontend._normalize_negative_indices(bb, checked, extent), axis, mode="clip")
