"""`lstm-export demo`: the whole pipeline on a small model, step by step, in a few minutes."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from . import checkpoint as ckpt_io
from .config import ModelConfig, TrainConfig, load_preset
from .data import default_corpus
from .export import export_onnx
from .train import sample, train


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run_demo(out: Path, minutes: float = 1.0, quiet: bool = False) -> int:
    """Trains the char-tiny model on this Python's stdlib sources, samples, exports, compares runtimes."""
    from runtimes.base import ONNX_RUNTIMES, get_runtime, list_runtimes
    from runtimes.compare import compare
    from runtimes.model_io import load_onnx, random_feeds
    if out.exists():
        shutil.rmtree(out)
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

    _step("compare: every available runtime against our torch model, same inputs")
    names = [n for n, a in list_runtimes().items() if a and n in ONNX_RUNTIMES]
    ok = True
    for mode, path in paths.items():
        feeds = random_feeds(load_onnx(path), seed=0, dims={"batch": 4, "time": 64})
        rts = [get_runtime("torch", model=model), get_runtime("torch-nn", model=model)] + [get_runtime(n) for n in names]
        report = compare(path, rts, feeds, atol=1e-4, rtol=1e-4, seed=0)
        print(f"\n[{mode}]\n{report.table()}")
        ok = ok and report.passed

    if list_runtimes()["tvm-llvm"]:
        from runtimes.tvm_lstm.compile import compile_onnx
        _step("compile: the native graph with TVM for this CPU -> model.so (loads with the TVM runtime alone)")
        lib = compile_onnx(paths["native"], out / "tvm", "llvm")
        print(f"{lib} ({lib.stat().st_size / 1e6:.2f} MB)")

    _step("serve: two interleaved streams on one micro-batched session, then one generated line")
    from runtimes.streaming import StreamingSession
    with StreamingSession(paths["streaming"]) as session:
        a, b = session.open(), session.open()
        for text in ("def main(", "class Foo", "):\n    ", ":\n    "):
            session.feed_text(a if text[0] in "d)" else b, text)
        print(f"fed 4 chunks to 2 streams in {session.stats.batches} batched runs")
    print(sample(model, ck.vocab, "import ", 60, 0.5, seed=1).splitlines()[0])

    if list_runtimes()["tvm-llvm"]:
        from runtimes.bench import Shape, bench
        _step("bench: this model at T=64, batch 1 (median ms; the full benchmark is scripts/bench.sh)")
        cfg = ck.model_config
        shape = Shape(64, 1, cfg.vocab_size, cfg.hidden, cfg.layers, lm=True)
        report = bench([shape], ["torch.nn.LSTM", "ort-cpu native", "tvm-llvm native"], min_s=0.3, progress=False)
        print(report.table())
    return 0 if ok else 1
