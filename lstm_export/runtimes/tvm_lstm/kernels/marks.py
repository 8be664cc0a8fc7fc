"""The one way to mark our hand-scheduled TIR kernels, on CPU and CUDA alike: a PrimFunc attribute
set where the converter adds the kernel. TVM's own scheduling passes (generic_schedule, MetaSchedule
tuning) leave marked kernels alone; a name prefix would not survive a user's renaming pass."""
from __future__ import annotations

OUR_KERNEL = "lstm_export.kernel"


def mark(func):
    """`func` (a tirx.PrimFunc) marked as ours."""
    return func.with_attr(OUR_KERNEL, True)


def is_ours(func) -> bool:
    return bool(func.attrs) and OUR_KERNEL in func.attrs
