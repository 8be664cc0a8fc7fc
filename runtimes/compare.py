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

from lstm_export.errors import UserError

from .base import Runtime, get_runtime
from .model_io import check_feeds, input_specs, load_onnx, metadata, output_specs


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


@dataclass
class RuntimeResult:
    runtime: str
    outputs: list[OutputError] = field(default_factory=list)
    error: str = ""  # set when the runtime failed to run

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
        rows.append(f"{'runtime':<16}{'output':<10}{'max abs':>11}{'max rel':>11}{'atol':>9}{'rtol':>9}  result")
        for r in self.results:
            if r.error:
                rows.append(f"{r.runtime:<16}{'-':<10}{'':>11}{'':>11}{'':>9}{'':>9}  ERROR {r.error}")
            for o in r.outputs:
                rows.append(f"{r.runtime:<16}{o.name:<10}{o.max_abs:>11.3g}{o.max_rel:>11.3g}{o.atol:>9.0e}"
                            f"{o.rtol:>9.0e}  {'ok' if o.passed else 'MISMATCH'}{'  ' + o.note if o.note else ''}")
        rows += [f"warning: {w}" for w in self.warnings]
        rows.append("PASS" if self.passed else "FAIL")
        return "\n".join(rows)


def time_axes(model) -> dict[str, int]:
    """Output name -> its time axis: a dim named like time/seq, else what our metadata says."""
    axes = {}
    cfg = metadata(model).get("lstm_export.config", {})
    for s in output_specs(model):
        named = [i for i, d in enumerate(s.shape) if isinstance(d, str) and ("time" in d or "seq" in d)]
        if named:
            axes[s.name] = named[0]
        elif cfg and s.name in ("output", "logits"):
            axes[s.name] = 1 if (cfg.get("batch_first") or cfg.get("kind") == "char_lm") else 0
    return axes


def output_error(name: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float,
                 time_axis: int | None) -> OutputError:
    """Elementwise |got - ref| <= atol + rtol * |ref|, NaNs equal only to NaNs."""
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


def compare(model_path: str | Path, runtimes: list[str | Runtime], feeds: dict[str, np.ndarray],
            reference: str | Runtime | None = None, atol: float = 1e-5, rtol: float = 1e-4,
            tolerances: dict[str, tuple[float, float]] | None = None, seed: int | None = None) -> CompareReport:
    """Runs `reference` and every runtime on `feeds`; returns the per-output error report.

    Args:
        model_path: the ONNX file (also given to torch runtimes, which read only its names).
        runtimes: names from the registry or prepared-able Runtime objects.
        feeds: inputs keyed by graph input name; checked against the graph first.
        reference: the runtime whose outputs are the truth (default: the first of `runtimes`).
        atol, rtol: default tolerances; `tolerances` overrides them per output name.
        seed: recorded in the report when the feeds were random.
    """
    model = load_onnx(model_path)
    warnings = check_feeds(input_specs(model), feeds)
    rts = [get_runtime(r) if isinstance(r, str) else r for r in runtimes]
    ref_rt = rts[0] if reference is None else (get_runtime(reference) if isinstance(reference, str) else reference)
    others = [r for r in rts if r is not ref_rt]
    axes = time_axes(model)
    tolerances = tolerances or {}
    unknown = set(tolerances) - {o.name for o in model.graph.output}
    if unknown:
        raise UserError(f"--tol names unknown outputs {sorted(unknown)}; outputs are "
                        f"{[o.name for o in model.graph.output]}")

    with ref_rt:
        ref_rt.prepare(model_path)
        ref_out = ref_rt.run(feeds)
    results = []
    for rt in others:
        res = RuntimeResult(rt.name)
        try:
            with rt:
                rt.prepare(model_path)
                out = rt.run(feeds)
        except UserError as e:
            res.error = str(e)
            results.append(res)
            continue
        for name, ref in ref_out.items():
            if name not in out:
                res.outputs.append(OutputError(name, float("inf"), float("inf"), atol, rtol, False, note="missing"))
                continue
            a, r = tolerances.get(name, (atol, rtol))
            res.outputs.append(output_error(name, out[name], ref, a, r, axes.get(name)))
        results.append(res)
    for name, ref in ref_out.items():
        if np.issubdtype(ref.dtype, np.floating) and np.isnan(ref).any():
            warnings.append(f"reference output {name} holds NaN")
    return CompareReport(str(model_path), ref_rt.name, seed, {k: list(v.shape) for k, v in feeds.items()},
                         results, warnings)


def plot_errors(report: CompareReport, path: str | Path) -> None:
    """Max |error| against time step, one line per runtime and output (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    drawn = False
    for r in report.results:
        for o in r.outputs:
            if o.per_step:
                ax.plot(range(len(o.per_step)), np.maximum(o.per_step, 1e-12), label=f"{r.runtime}: {o.name}")
                drawn = True
    ax.set_yscale("log")
    ax.set_xlabel("time step")
    ax.set_ylabel(f"max |error| vs {report.reference}")
    ax.set_title(Path(report.model).name)
    ax.grid(alpha=0.3, which="both")
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
