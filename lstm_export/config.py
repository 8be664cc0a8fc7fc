"""Dataclass configs for the char language model and its training, and the named presets in models/."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from lstm_export.common.errors import UserError

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


@dataclass
class ModelConfig:
    """Char language model: embedding -> LSTM (or LayerNormLSTM) -> linear head."""

    vocab_size: int = 0  # set from the corpus
    embed: int = 64
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.0
    cell: str = "lstm"  # "lstm" | "layernorm"


@dataclass
class TrainConfig:
    """Truncated-BPTT training; every field is a `lstm-export train` flag of the same name."""

    bptt: int = 64
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    clip: float = 1.0
    steps: int = 1000
    minutes: float = 0.0  # 0: no time limit
    seed: int = 1337
    eval_every: int = 100
    eval_chars: int = 20000  # validation characters per evaluation (0: the whole held-out tail)
    val_fraction: float = 0.1
    warmup: int = 50
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at `steps`


def load_preset(name: str) -> dict:
    """A named config from models/NAME.json as {"model": {...}, "train": {...}}."""
    path = MODELS_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in MODELS_DIR.glob("*.json"))
        raise UserError(f"unknown config {name!r}; choose one of {', '.join(known) or '(none found)'}")
    data = json.loads(path.read_text())
    _check_keys(data.get("model", {}), ModelConfig, path)
    _check_keys(data.get("train", {}), TrainConfig, path)
    return data


def _check_keys(d: dict, cls, path: Path) -> None:
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise UserError(f"{path}: unknown {cls.__name__} keys {sorted(unknown)}; known keys are {sorted(known)}")

