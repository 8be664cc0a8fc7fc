"""Slice that reverses whole axes, as a flip.

Exporters reverse the time axis with Slice(x, starts=[-1], ends=[-INT64_MAX], steps=[-1]): a
bidirectional layer made of two forward layers reads the sequence flipped, and flips its output
back. On a symbolic axis TVM's Slice gives the result an extent of max(min(BOUND - 1, T), 0)
(slice_bounds.py clamps the end to -BOUND first), which no pass can prove equal to T, so the
Concat of the two directions cannot be lowered ("CodeGenVM cannot emit this Relax operator").
relax.op.flip keeps the extent T, and computes the same elements.
"""
from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from .convert_options import DEFAULT
from .rnn_node import constant_value
from .slice_bounds import BOUND


def reversed_axes(rank: int, starts, ends, axes, steps) -> list[int] | None:
    """The axes a Slice reverses whole (step -1 from the last element, or past it, to before the
    first on any length below BOUND), when it does nothing else; None otherwise."""
    if any(v is None for v in (starts, ends)) or rank is None:
        return None
    axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes]
    steps = [1] * len(axes) if steps is None else list(steps)
    if len(set(axes)) != len(axes) or not all(len(v) == len(axes) for v in (starts, ends, steps)):
        return None
    whole = (all(int(st) == -1 for st in steps) and all(int(s) == -1 or int(s) >= BOUND - 1 for s in starts)
             and all(int(e) <= -BOUND for e in ends))
    return axes if whole and axes else None


class FlipSlice(onnx_frontend.Slice):
    """TVM's Slice, except a whole-axis reversal, which becomes relax.op.flip (module docstring)."""

    options = DEFAULT  # this import's (registry._bound)

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data = inputs[0]
        values = [constant_value(v) if v is not None else None for v in (list(inputs) + [None] * 5)[1:5]]
        ty = getattr(data, "ty", None)
        rank = len(ty.shape.values) if getattr(ty, "shape", None) is not None else None
        flips = reversed_axes(rank, *(np.asarray(v).ravel() if v is not None else None for v in values)) \
            if not isinstance(data, relax.ShapeExpr) else None
        if flips is None:
            return super()._impl_v13(bb, inputs, attr, params)
        for axis in flips:
            data = bb.emit(relax.op.flip(data, axis))
        return data
