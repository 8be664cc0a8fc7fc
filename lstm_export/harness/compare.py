"""Runs one model on several runtimes with the same feeds and compares every output to a reference.

The result is a truthy report (like Polygraphy's comparator): per runtime and output the max
absolute and relative error, the error per time step (does it grow with t?), and pass/fail
against atol + rtol * |reference| elementwise.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lstm_export.common.agreement import OutputError, outputs_error, tolerance_for
from lstm_export.common.errors import UserError
from lstm_export.common.plotting import figure
from lstm_export.runtimes.base import Runtime, create
from lstm_export.runtimes.source import open_model


@dataclass
class RuntimeResult:
    runtime: str
    outputs: list[OutputError] = field(default_factory=list)
    error: str = ""  # set when the runtime failed to run
    precision: str = "fp32"  # what it computed in; its tolerance is derived from it (tolerance_for)

    @property
    def passed(self) -> bool:
        return not self.error and all(o.passed for o in self.outputs)


@dataclass
class CompareReport:
    model: str
    reference: str
    seed: int | None
    inputs: dict[str, list[int]]
    results: list[RuntimeResult]
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def __bool__(self) -> bool:
        return self.passed

    def to_json(self, path: str | Path) -> None:
        d = asdict(self)
        d["passed"] = self.passed
        Path(path).write_text(json.dumps(d, indent=1) + "\n")

    def table(self) -> str:
        rows = [f"reference: {self.reference}   inputs: " + ", ".join(f"{k}{v}" for k, v in self.inputs.items())
                + (f"   seed: {self.seed}" if self.seed is not None else "")]
        rows.append(f"{'runtime':<18}{'prec':<6}{'output':<10}{'max abs':>11}{'max rel':>11}{'atol':>9}{'rtol':>9}"
                    "  result")
        for r in self.results:
            if r.error:
                rows.append(f"{r.runtime:<18}{r.precision:<6}{'-':<10}{'':>11}{'':>11}{'':>9}{'':>9}  ERROR {r.error}")
            for o in r.outputs:
                rows.append(f"{r.runtime:<18}{r.precision:<6}{o.name:<10}{o.max_abs:>11.3g}{o.max_rel:>11.3g}"
                            f"{o.atol:>9.0e}{o.rtol:>9.0e}  {'ok' if o.passed else 'MISMATCH'}"
                            f"{'  ' + o.note if o.note else ''}{_drift(o)}")
        rows += [f"warning: {w}" for w in self.warnings]
        rows.append("PASS" if self.passed else "FAIL")
        return "\n".join(rows)


def time_axes(source) -> dict[str, int]:
    """Output name -> its time axis: a dim named like time/seq, else what our metadata says."""
    axes = {}
    cfg = source.metadata().get("lstm_export.config", {})
    for s in source.outputs:
        named = [i for i, d in enumerate(s.shape) if isinstance(d, str) and ("time" in d or "seq" in d)]
        if named:
            axes[s.name] = named[0]
        elif cfg and s.name in ("output", "logits"):
            axes[s.name] = 1 if (cfg.get("batch_first") or cfg.get("kind") == "char_lm") else 0
    return axes


def compare(model, runtimes: list[str | Runtime], feeds: dict[str, np.ndarray],
            reference: str | Runtime | None = None, atol: float = 1e-5, rtol: float = 1e-4,
            tolerances: dict[str, tuple[float, float]] | None = None, seed: int | None = None,
            allow_nonfinite: bool = False) -> CompareReport:
    """Runs `reference` and every runtime on `feeds`; returns the per-output error report.

    Args:
        model: an .onnx path, a compiled folder or a source.ModelSource (torch runtimes read only
            its input names).
        runtimes: names from the registry or Runtime objects. A runtime already prepared is run
            as it is and left prepared (so a caller can compare twice without preparing twice);
            the others are prepared here and released at the end.
        feeds: inputs keyed by graph input name; checked against the model first.
        reference: the runtime whose outputs are the truth (default: the first of `runtimes`).
            Its failure raises; any other runtime's failure is a row of the report.
        atol, rtol: default tolerances; `tolerances` overrides them per output name.
        seed: recorded in the report when the feeds were random.
        allow_nonfinite: run NaN/Inf inputs instead of refusing them.
    """
    source = open_model(model)
    source.check_feeds(feeds, allow_nonfinite)
    rts = [create(r) if isinstance(r, str) else r for r in runtimes]
    ref_rt = rts[0] if reference is None else (create(reference) if isinstance(reference, str) else reference)
    others = [r for r in rts if r is not ref_rt]
    axes = time_axes(source)
    tolerances = tolerances or {}
    unknown = set(tolerances) - set(source.output_names)
    if unknown:
        raise UserError(f"--tol names unknown outputs {sorted(unknown)}; outputs are {source.output_names}")
    ours: list[Runtime] = []  # prepared here, released here
    try:
        ref_out = _run(ref_rt, source, feeds, allow_nonfinite, ours)
        results = []
        for rt in others:
            res = RuntimeResult(rt.name)
            try:
                out = _run(rt, source, feeds, allow_nonfinite, ours)
            except UserError as e:  # RuntimeFailure included: a row, and the report goes on
                res.error = str(e)
            else:  # a reduced-precision runtime is held to its format's tolerance, unless --tol says
                res.precision = getattr(rt, "precision", "fp32")
                a, r = tolerance_for(res.precision, atol, rtol)
                res.outputs = outputs_error(out, ref_out, a, r, tolerances, axes)
            results.append(res)
    finally:
        for rt in ours:
            rt.release()
    warnings = [f"reference output {name} holds NaN" for name, ref in ref_out.items()
                if np.issubdtype(ref.dtype, np.floating) and np.isnan(ref).any()]
    return CompareReport(str(source.path), ref_rt.name, seed, {k: list(v.shape) for k, v in feeds.items()},
                         results, warnings)


def _drift(o: OutputError) -> str:
    """'  first/last step error' for an output with a time axis, where reduced precision drifts."""
    if not o.per_step or len(o.per_step) < 2:
        return ""
    return f"  (step 0 {o.per_step[0]:.2g}, last {o.per_step[-1]:.2g})"


def _run(rt: Runtime, source, feeds, allow_nonfinite: bool, ours: list) -> dict[str, np.ndarray]:
    if not rt.prepared:
        ours.append(rt)
        rt.prepare(source)
    rt.allow_nonfinite = allow_nonfinite
    return rt.run(feeds)


def plot_errors(report: CompareReport, path: str | Path) -> None:
    """Max |error| against time step, one line per runtime and output (log scale)."""
    with figure(path) as (_, ax):
        drawn = False
        for r in report.results:
            for o in r.outputs:
                if o.per_step:
                    ax.plot(range(len(o.per_step)), np.maximum(o.per_step, 1e-12),
                            label=f"{r.runtime} ({r.precision}): {o.name}")
                    drawn = True
        ax.set_yscale("log")
        ax.set_xlabel("time step")
        ax.set_ylabel(f"max |error| vs {report.reference}")
        ax.set_title(Path(report.model).name)
        ax.grid(alpha=0.3, which="both")
        if drawn:
            ax.legend(fontsize=8)
