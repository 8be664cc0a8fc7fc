"""A default CPU schedule for the generic kernels around the LSTM (MatMul heads, projections).

TVM's CPU pipeline legalizes Relax ops to plain loop nests and schedules none of them. This pass
gives every fused function whose main block is a reduction ending in a contiguous spatial axis a
simple schedule: the last spatial axis split into vector lanes (the target's: cpu_plan), the reduction moved outside the
lanes, the outer spatial loops fused and parallel. Anything it cannot schedule is left as it was.
"""
from __future__ import annotations

from .marks import is_ours


def default_schedule(func, lanes: int = 16):
    """The traced s_tir.Schedule of `func` (global_symbol "main") that compile uses without a tuning
    database, or None where this pass leaves the plain loop nest. The trace seeds the database."""
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    if len(reductions) != 1:
        return None
    block = reductions[0]
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    if len(loops) < 2 or kinds[-1] != 2 or any(k != 0 for k in kinds[:-1]):  # S..S R, reduction innermost
        return None
    j, k = loops[-2], loops[-1]
    outer = list(loops[:-2])
    extent = sch.get(j).extent
    vector = hasattr(extent, "value") and extent.value % lanes == 0
    if vector:
        jo, ji = sch.split(j, [None, lanes])
        sch.reorder(*outer, jo, k, ji)
    else:  # e.g. a vocabulary-sized axis: k outside the contiguous axis, LLVM vectorizes the rest
        sch.reorder(*outer, k, j)
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    if vector:
        sch.vectorize(ji)  # before decompose_reduction: afterwards the block is no longer complete
    sch.decompose_reduction(block, k)
    return sch


def _schedule_reduction(func, lanes: int):
    sch = default_schedule(func, lanes)
    return None if sch is None else sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


def _is_reduction(sch, block) -> bool:
    return any(iv.iter_type == 2 for iv in sch.get(block).iter_vars)


def schedule_generic_cpu_kernels(mod, lanes: int = 16):
    """Schedules what it can of the legalized, fused module's unscheduled PrimFuncs (see above)."""
    from tvm import tirx
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs and "tirx.is_scheduled" in func.attrs:
            continue
        if is_ours(func):
            continue  # our own kernels are written scheduled
        try:
            scheduled = _schedule_reduction(func.with_attr("global_symbol", gv.name_hint), lanes)
        except Exception:  # noqa: BLE001 -- unschedulable: keep the plain loop nest
            scheduled = None
        if scheduled is not None:
            updates[gv] = (
                scheduled.without_attr("global_symbol") if "global_symbol" not in (func.attrs or {}) else scheduled
            )
    for gv, func in updates.items():
        mod[gv] = func
    return mod
