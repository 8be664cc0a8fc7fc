"""`lstm-export demo`: the whole pipeline on a small model, step by step, in a few minutes."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from . import checkpoint as ckpt_io
from .config import ModelConfig, TrainConfig, load_preset
from .data import default_corpus
from .train import sample, train


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run_demo(out: Path, minutes: float = 1.0, quiet: bool = False) -> int:
    """Trains the char-tiny model on this Python's stdlib sources, then samples from it."""
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
    print(sample(ck.build_model(), ck.vocab, "def ", 300, 0.7, seed=0))
    return 0
