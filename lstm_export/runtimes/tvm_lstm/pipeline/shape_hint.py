"""compile's --input-shape hint for a model that TVM cannot compile with symbolic input dims: given
only when following it works (the model is compiled with it here first)."""
from __future__ import annotations

import tempfile

from lstm_export.common.errors import UserError


def shape_hint(source, options=None, probe: int = 8) -> tuple[str, str] | None:
    """For a model that failed to compile with symbolic input dims: (`--input-shape` arguments that
    name each open dim (`<x.dim1>`, or the dim's own name where the model names it: equal names,
    equal numbers), the same with the numbers it compiled with), or None. Given only when
    following it works: the model is compiled here, with `options` (a CompileOptions; default
    llvm), every open dim at `probe` (then 1) and no plan timing, first."""
    from ...model_io import fixed_dim as _fixed
    from ...model_io import input_specs
    from .compile import compile_onnx
    from .options import CompileOptions
    options = (options or CompileOptions()).replace(progress=False, plan_budget_s=0, tune_trials=0)
    specs = [s for s in input_specs(source.onnx()) if s.shape and any(not _fixed(d) for d in s.shape)]
    if not specs:
        return None

    def shown(s, value=None):
        return "x".join(str(d) if _fixed(d) else str(value) if value is not None else
                        f"<{d if isinstance(d, str) and d != '?' else f'{s.name}.dim{k}'}>"
                        for k, d in enumerate(s.shape))
    with tempfile.TemporaryDirectory(prefix="lstm-export-hint-") as tmp:
        for value in dict.fromkeys((probe, 1)):
            shapes = {s.name: tuple(int(d) if _fixed(d) else value for d in s.shape) for s in specs}
            try:
                compile_onnx(source, tmp, options, input_shapes=shapes)
            except UserError:
                continue
            return (" ".join(f"--input-shape {s.name}={shown(s)}" for s in specs),
                    " ".join(f"--input-shape {s.name}={shown(s, value)}" for s in specs))
    return None
