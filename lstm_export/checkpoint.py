"""Checkpoints: written atomically, loaded with every failure turned into a one-line UserError."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lstm_export.common.errors import UserError

from .charlm import CharLM
from .config import ModelConfig, TrainConfig
from .data import Vocab

FORMAT = "lstm-export-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """Everything needed to sample, export or resume: model + vocabulary, and the training state."""

    model_config: ModelConfig
    train_config: TrainConfig
    vocab: Vocab
    model_state: dict
    step: int = 0
    elapsed_s: float = 0.0
    optimizer_state: dict | None = None
    hidden: tuple | None = None  # the TBPTT state carried into the next window
    rng_state: torch.Tensor | None = None
    history: list = field(default_factory=list)  # [{"step", "time_s", "train_loss", "val_loss", ...}]
    corpus: dict | None = None  # {"path": the --text file or None (the default corpus), "sha256"}: for --resume

    def build_model(self) -> CharLM:
        model = CharLM(self.model_config, self.vocab)
        try:
            model.load_state_dict(self.model_state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[1:2] or [str(e)]
            raise UserError(f"checkpoint weights do not match its config {asdict(self.model_config)}: "
                            f"{first[0].strip()}; the file was made by another version or edited") from None
        return model.eval()


def save(ckpt: Checkpoint, path: str | Path) -> None:
    """Writes `path` atomically: a temporary file in the same folder, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT, "version": VERSION,
        "model_config": asdict(ckpt.model_config), "train_config": asdict(ckpt.train_config),
        "vocab": ckpt.vocab.chars, "model": ckpt.model_state, "step": ckpt.step,
        "elapsed_s": ckpt.elapsed_s, "optimizer": ckpt.optimizer_state,
        "hidden": list(ckpt.hidden) if ckpt.hidden is not None else None,
        "rng_state": ckpt.rng_state, "history": ckpt.history, "corpus": ckpt.corpus,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # a full disk reaches torch.save as OSError(ENOSPC) or as its zip writer's RuntimeError
        # ("unexpected pos ..."): name it plainly either way
        if isinstance(e, (OSError, RuntimeError)) and (getattr(e, "errno", None) == errno.ENOSPC
                                                       or shutil.disk_usage(path.parent).free < 1 << 20):
            raise UserError(f"no space left on the device writing {path}; free some space and continue with "
                            "--resume (the previous checkpoint is intact)") from None
        raise


TMP_SUFFIX = ".tmp"


def remove_stale_temps(folder: str | Path, name: str = "ckpt.pt") -> list[Path]:
    """Deletes what killed or failed writes of `name` left in `folder` (its .NAME.*.tmp files)."""
    stale = list(Path(folder).glob(f".{name}.*{TMP_SUFFIX}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load(path: str | Path) -> Checkpoint:
    """Reads a checkpoint; a missing, truncated, corrupted or foreign file raises UserError."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train one with `lstm-export train --out DIR`")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad zip/pickle; all mean the same here
        raise UserError(f"checkpoint {path} is corrupted or truncated ({type(e).__name__}); "
                        "use an earlier checkpoint or train again") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise UserError(f"{path} is not an lstm-export checkpoint; pass a file written by `lstm-export train`")
    if d.get("version") != VERSION:
        raise UserError(f"{path} is checkpoint format v{d.get('version')}, this version reads v{VERSION}")
    missing = [k for k in ("model_config", "train_config", "vocab", "model", "step") if k not in d]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}; it was edited or made by another program")
    try:
        mc, tc = ModelConfig(**d["model_config"]), TrainConfig(**d["train_config"])
    except TypeError as e:
        raise UserError(f"checkpoint {path} has an unknown config ({e}); it was made by another version") from None
    if mc.vocab_size != len(d["vocab"]):
        raise UserError(f"checkpoint {path}: vocabulary has {len(d['vocab'])} characters but the config "
                        f"says {mc.vocab_size}; the file was edited or is corrupted")
    hidden = tuple(d["hidden"]) if d.get("hidden") is not None else None
    return Checkpoint(mc, tc, Vocab(d["vocab"]), d["model"], d["step"], d.get("elapsed_s", 0.0),
                      d.get("optimizer"), hidden, d.get("rng_state"), d.get("history", []), d.get("corpus"))
