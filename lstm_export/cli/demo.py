"""`lstm-export demo`: the whole pipeline on a small model, step by step, in a few minutes."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from lstm_export import checkpoint as ckpt_io
from lstm_export.common.errors import UserError
from lstm_export.config import ModelConfig, TrainConfig, load_preset
from lstm_export.data import default_corpus
from lstm_export.export import export_onnx
from lstm_export.runtimes.source import open_model
from lstm_export.train import sample, train

MARKER = ".lstm-export-demo"  # a folder the demo made, and so may replace


def feeds_for(model, batch: int = 4) -> dict:
    """Random inputs for a demo model: 64 time steps, `batch` rows, ids within the vocabulary."""
    from lstm_export.runtimes.model_io import random_feeds
    return random_feeds(open_model(model), seed=0, dims={"batch": batch, "time": 64})


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run_demo(out: Path, minutes: float = 1.0, quiet: bool = False) -> int:
    """Trains the char-tiny model on this Python's stdlib sources, samples, exports, compares runtimes."""
    from lstm_export.harness.compare import compare
    from lstm_export.runtimes.base import ONNX_RUNTIMES, RuntimeOptions, create, list_runtimes
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise UserError(f"--out {out} exists and was not made by the demo; choose an empty or new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    preset = load_preset("char-tiny")
    model_cfg = ModelConfig(**preset["model"])
    train_cfg = replace(TrainConfig(**preset["train"]), minutes=minutes, steps=100_000)

    _step(f"train: char-tiny on the Python standard library for {minutes:g} min -> {out}/ckpt.pt")
    res = train(default_corpus(), model_cfg, train_cfg, out, progress=not quiet)
    print(f"step {res.step}: train {res.train_loss:.3f}, val {res.val_loss:.3f} nats/char "
          f"({res.val_bpc:.2f} bits/char), {res.chars_per_s:,.0f} chars/s")

    _step("sample: 300 characters at temperature 0.7")
    ck = ckpt_io.load(out / "ckpt.pt")
    model = ck.build_model()
    print(sample(model, ck.vocab, "def ", 300, 0.7, seed=0))

    _step("export: unrolled (T=64), native and streaming ONNX graphs")
    paths = {}
    for mode in ("unrolled", "native", "streaming"):
        paths[mode] = export_onnx(model, out / f"model.{mode}.onnx", mode, seq_len=64 if mode == "unrolled" else None)
        print(f"{mode:<10} {paths[mode]} ({paths[mode].stat().st_size / 1e6:.2f} MB)")

    compiled = None
    sources = dict(paths)
    if list_runtimes()["tvm-llvm"]:
        from lstm_export.runtimes.tvm_lstm import compile_onnx
        _step("compile: the native graph with TVM for this CPU -> model.so (loads with the TVM runtime alone)")
        compiled = compile_onnx(paths["native"], out / "tvm", target="llvm")
        print(f"{compiled.library} ({compiled.library.stat().st_size / 1e6:.2f} MB)")
        # from here on the native model is the folder `compile` wrote: tvm-llvm loads its model.so
        # (no second compile), the other runtimes its model.onnx
        sources["native"] = compiled.folder

    _step("compare: every available runtime against our torch model, same inputs")
    names = [n for n, a in list_runtimes().items() if a and n in ONNX_RUNTIMES]
    ok = True
    for mode, where in sources.items():
        rts = [create(n, RuntimeOptions(model=model)) for n in ("torch", "torch-nn")]
        source = open_model(where)  # read once for the feeds and the comparison
        report = compare(source, rts + [create(n) for n in names], feeds_for(source), atol=1e-4, rtol=1e-4,
                         seed=0)
        print(f"\n[{mode}: {where}]\n{report.table()}")
        ok = ok and report.passed

    _step("serve: two interleaved streams on one micro-batched session, then one generated line")
    from lstm_export.serving.streaming import StreamingSession
    with StreamingSession(paths["streaming"]) as session:
        a, b = session.open(), session.open()
        for text in ("def main(", "class Foo", "):\n    ", ":\n    "):
            session.feed_text(a if text[0] in "d)" else b, text)
        print(f"fed 4 chunks to 2 streams in {session.stats.batches} batched runs")
    print(sample(model, ck.vocab, "import ", 60, 0.5, seed=1).splitlines()[0])

    if compiled is not None:
        from lstm_export.harness.model_bench import bench_model

        cfg = ck.model_config
        label = (f"this char LM (vocab {cfg.vocab_size}, embed {cfg.embed}, hidden {cfg.hidden}, "
                 f"{cfg.layers} layers), T=64 B=1")
        _step(f"bench: {label}, from {compiled.folder} (median ms; the full benchmark is scripts/bench.sh)")
        folder = open_model(compiled.folder)
        report = bench_model(folder, ["ort-cpu", "tvm-llvm"], feeds_for(folder, batch=1),
                             label=label, min_s=0.3)
        print(report.table())
    return 0 if ok else 1
