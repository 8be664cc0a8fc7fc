"""Re-tuning the committed MetaSchedule database on the bench's shapes (scripts/tune_bench.py)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from .bench import DEFAULT_SHAPES, _model


def tune_shapes(shapes=None, trials: int = 64, tuning_db=None, threads: int | None = None,
                progress: bool = True) -> list[dict]:
    """MetaSchedule-tunes the kernels of each shape's graphs into the tuning database that `compile`
    reads (default: the committed one for this CPU), `trials` per graph; then compiles each graph with
    it. Native graphs have dynamic T and B, so only their static kernels (none, today) are tuned.
    Returns one row per graph: tuned kernels, their ms before and after, tuning and compile seconds."""

    from lstm_export.export import export_onnx
    from lstm_export.runtimes.tvm_lstm import compile_onnx
    rows = []
    with tempfile.TemporaryDirectory(prefix="lstm-export-tune-") as tmp:
        for shape in shapes or DEFAULT_SHAPES:
            model = _model(shape)
            for graph in ("native", "unrolled"):
                path = Path(tmp) / f"{graph}.onnx"
                kwargs = {"seq_len": shape.T, "batch_size": shape.B} if graph == "unrolled" else {}
                export_onnx(model, path, graph, **kwargs)
                if progress:
                    print(f"{shape.name} {graph}", flush=True)
                meta = compile_onnx(path, Path(tmp) / "out", target="llvm", threads=threads, tuning_db=tuning_db,
                                    tune_trials=trials, progress=progress).meta
                tuning = meta.tuning or {}
                rows.append({"shape": shape.name, "graph": graph, "kernels": len(tuning.get("tasks", [])),
                             "trials": tuning.get("trials", 0), "tune_s": tuning.get("seconds", 0.0),
                             "before_ms": tuning.get("before_ms", {}), "best_ms": tuning.get("best_ms", {}),
                             "kernels_from_db": meta.kernels_from_db, "compile_s": meta.compile_s})
    return rows
