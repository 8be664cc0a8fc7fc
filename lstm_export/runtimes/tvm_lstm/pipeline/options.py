"""CompileOptions: everything `compile` is told, as one value, made once (from the command line in
cli/compile_cmd.py, or from keywords of the API) and checked here, where it is made. The stages
(compile.py) read it and check nothing again."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from lstm_export.common.errors import UserError

PRECISIONS = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class CompileOptions:
    """What to compile for, and how.

    target: "llvm" (this CPU's features and cores), "cuda", or a full TVM target as JSON or in
        the CLI string form (`llvm -mcpu=haswell -num-cores=4`,
        `{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1"}`); see targets.py.
    arch: CUDA architecture for target="cuda".
    threads: cores the llvm target assumes (default: the target's num-cores, else this machine's).
    tuning_db: MetaSchedule database folder for llvm (default: the committed one for this CPU and
        core count, when there is one; see tuning.py). "none" compiles without one.
    tune_trials: > 0 first tunes this model's kernels into tuning_db with that many trials.
    progress: a line per plan candidate timed, and tuning's progress bar, on stderr.
    plan: the CPU kernel's cpu_plan.KernelPlan; tests pass their own. Default: for a target this
        machine runs, the fastest of a few plans timed on the model's shapes (plan_select.py),
        else plan_for(target), the plan derived from the target.
    plan_budget_s: seconds that measuring may take; None reads $LSTM_EXPORT_PLAN_BUDGET_S, else
        10 (plan_select.budget_from), so the value held is always a number; 0 takes the derived
        plan. meta.json records the choice and its timings.
    dims: sizes for named symbolic dims, fixed before the graph is simplified (simplify.py); the
        others stay symbolic.
    input_shapes: whole static shapes of named inputs (compile --input-shape): written into the
        graph with the symbolic dims they bind, so shape arithmetic on them folds away; the
        artifact then takes those shapes only (meta.json records them).
    input_values: scalar inputs fixed to one value (compile --input-value sr=16000): constants in
        the graph, so an If on them folds to one branch; the artifact's main no longer takes them,
        and a run with another value is refused (meta.json records them).
    precision: "fp32"; "bf16": LSTM layers with bf16 weights and fp32 accumulation and state
        (kernels/lowp; llvm targets with AVX512-BF16, AMX where the CPU has it), each layer's
        engine timed here within plan_budget_s (meta.json's lowp_layers says what was chosen);
        "int8": int8 weights (AVX-512 VNNI) for the layers where they pay, bf16 for the others.
    """

    target: str = "llvm"
    arch: str = "sm_90"
    threads: int | None = None
    tuning_db: str | None = None
    tune_trials: int = 0
    progress: bool = True
    plan: object | None = None
    plan_budget_s: float | None = None
    dims: Mapping[str, int] = field(default_factory=dict)
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    input_values: Mapping[str, object] = field(default_factory=dict)
    precision: str = "fp32"

    def __post_init__(self):
        from .plan_select import budget_from
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision}: choose fp32, bf16 or int8")
        budget = budget_from(self.plan_budget_s)
        if budget < 0:
            raise UserError(f"--plan-budget-s {budget:g}: give 0 (the derived plan) or more seconds")
        if self.tune_trials < 0:
            raise UserError(f"--trials {self.tune_trials}: give a positive number of trials")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads {self.threads}: give 1 or more")
        set_ = object.__setattr__  # frozen: the normalised values are set once, here
        set_(self, "plan_budget_s", budget)
        set_(self, "tuning_db", None if self.tuning_db is None else str(self.tuning_db))
        for name in ("dims", "input_shapes", "input_values"):
            set_(self, name, dict(getattr(self, name) or {}))
        set_(self, "input_shapes", {k: tuple(v) for k, v in self.input_shapes.items()})

    @property
    def no_tuning_db(self) -> bool:
        return self.tuning_db == "none"

    def replace(self, **changes) -> CompileOptions:
        return dataclasses.replace(self, **changes)


def options_from(options: CompileOptions | None, fields: dict) -> CompileOptions:
    """The API's way in: `options`, CompileOptions made from keyword `fields`, or `options` with
    those fields replaced."""
    if options is None:
        return CompileOptions(**fields)
    return options.replace(**fields) if fields else options
