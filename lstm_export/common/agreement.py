"""One output comparison: does a runtime's output equal the reference's, under one tolerance policy?

|got - ref| <= atol + rtol * |ref| elementwise, NaN equal only to NaN, a shape difference a failure.
compare, both benches and the load test all judge equality with `output_error`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# (atol, rtol) a runtime computing in this precision is held to against an fp32 (or float64)
# reference: 8 units of the format's roundoff (bf16 keeps 8 significant bits, u = 2^-8; an int8
# weight step is ~2^-7 of the tensor's range), the growth a few hundred products and a recurrence
# add. fp32 runtimes keep the caller's tolerance.
PRECISION_TOLERANCE = {"bf16": (8 * 2.0 ** -8, 4 * 2.0 ** -8), "fp16": (8 * 2.0 ** -11, 4 * 2.0 ** -11),
                       "int8": (8 * 2.0 ** -7, 4 * 2.0 ** -7)}


def tolerance_for(precision: str, atol: float, rtol: float) -> tuple[float, float]:
    """The caller's (atol, rtol), widened to what `precision` can hold (PRECISION_TOLERANCE)."""
    a, r = PRECISION_TOLERANCE.get(precision, (0.0, 0.0))
    return max(atol, a), max(rtol, r)


@dataclass
class OutputError:
    name: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool
    per_step: list[float] | None = None  # max |error| at each time step, when the output has a time axis
    note: str = ""


def output_error(name: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float,
                 time_axis: int | None = None) -> OutputError:
    """The error of `got` against `ref`, with the max per step along `time_axis` when given."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        return OutputError(name, float("inf"), float("inf"), atol, rtol, False,
                           note=f"shape {list(got.shape)} vs reference {list(ref.shape)}")
    g, r = got.astype(np.float64), ref.astype(np.float64)
    both_nan = np.isnan(g) & np.isnan(r)
    diff = np.where(both_nan, 0.0, np.abs(g - r))
    diff = np.where(np.isnan(diff), np.inf, diff)
    rel = diff / np.maximum(np.abs(r), 1e-12)
    passed = bool(np.all(diff <= atol + rtol * np.abs(np.nan_to_num(r))))
    per_step = None
    if time_axis is not None and g.ndim > time_axis and g.size:
        per_step = np.moveaxis(diff, time_axis, 0).reshape(g.shape[time_axis], -1).max(axis=1).tolist()
    note = "NaN in reference" if np.isnan(r).any() else ""
    return OutputError(name, float(diff.max()) if diff.size else 0.0, float(rel.max()) if rel.size else 0.0,
                       atol, rtol, passed, per_step, note)


def outputs_error(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], atol: float, rtol: float = 0.0,
                  tolerances: dict[str, tuple[float, float]] | None = None,
                  time_axes: dict[str, int] | None = None) -> list[OutputError]:
    """output_error for every reference output (a missing one fails); tolerances per name override."""
    errors = []
    for name, r in ref.items():
        a, t = (tolerances or {}).get(name, (atol, rtol))
        if name not in got:
            errors.append(OutputError(name, float("inf"), float("inf"), a, t, False, note="missing"))
        else:
            errors.append(output_error(name, got[name], r, a, t, (time_axes or {}).get(name)))
    return errors
