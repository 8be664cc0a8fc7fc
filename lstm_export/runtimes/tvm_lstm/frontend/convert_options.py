"""ConvertOptions: what one import tells our converters, as one value (registry.lstm_registered
hands it to every converter of that import)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvertOptions:
    """cuda: emit the persistent CUDA kernels, and no CPU index checks; plan: the CPU kernel's
    cpu_plan.KernelPlan (None: the portable TIR loop only); lowp: kernels.lowp.layer.LowpOptions
    (compile --precision bf16|int8): LSTM layers with constant weights in reduced precision, and
    GRU and RNN nodes refused."""

    cuda: bool = False
    plan: object | None = None
    lowp: object | None = None


DEFAULT = ConvertOptions()  # the CPU's portable loop only: what TVM's own importer would make of the ops
