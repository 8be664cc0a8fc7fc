"""Calling the packed CPU kernel (cpu.make_cpu_layer) from a converter: the LSTM, GRU and RNN
converters all emit their constant-weight layers through `emit_cpu_layer`."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from tvm import relax, tirx

from .marks import mark


@dataclass(frozen=True)
class DirectionIO:
    """One direction's Relax values as a converter hands them to a kernel: the initial state h0, c0
    (B, H) each, or (1, H) placeholders the kernel never reads when has_state is False; the int32
    lengths (B,), or a (1,) placeholder without sequence_lens; the run's T and B (symbolic or not)."""

    h0: object
    c0: object
    lens: object
    n_t: object
    n_b: object
    has_state: bool


@functools.lru_cache(maxsize=16)  # built once for both directions, and for a layer compiled again
def _cpu_layer(spec, k_dim: int, plan, has_state: bool, has_peepholes: bool):
    from .cpu import make_cpu_layer
    return make_cpu_layer(spec, k_dim, plan, has_state=has_state, has_peepholes=has_peepholes)


def emit_cpu_layer(bb, spec, k_dim: int, plan, has_state: bool, has_peepholes: bool, args, n_t, n_b):
    """Calls the fast CPU kernel (cpu.make_cpu_layer) on args (x, packed weights, peepholes, h0, c0,
    lens) -> (y, hn, cn). Both directions of a layer build the same function, which the BlockBuilder
    adds once; the direction is its scalar argument."""
    from .cpu_plan import layer_plan
    func = _cpu_layer(dataclasses.replace(spec, reverse=False), k_dim, layer_plan(spec, k_dim, plan), has_state,
                      has_peepholes)
    layer = bb.add_func(mark(func), f"{getattr(spec, 'kind', 'LSTM').lower()}_layer_cpu")
    y, state = relax.TensorType([n_t, n_b, spec.hidden], "float32"), relax.TensorType([n_b, spec.hidden], "float32")
    out = bb.emit(relax.call_tir(layer, [*args, tirx.IntImm("int64", int(spec.reverse))],
                                 [y, state, state]))
    return tuple(bb.emit(relax.TupleGetItem(out, i)) for i in range(3))
