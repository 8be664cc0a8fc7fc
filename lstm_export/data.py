"""Text corpora, the character vocabulary and the contiguous streams that truncated BPTT walks."""
from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lstm_export.common.errors import UserError

DEFAULT_CORPUS_CHARS = 4_000_000  # enough stdlib source for minutes of training, read in a second


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file; empty, missing or non-UTF-8 files raise UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file {p} does not exist; pass --text with a UTF-8 file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p} is not UTF-8 (bad byte at offset {e.start}); convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8.txt`") from None
    if not text.strip():
        raise UserError(f"{p} is empty; pass --text with a non-empty UTF-8 file")
    return text


def default_corpus(max_chars: int = DEFAULT_CORPUS_CHARS) -> str:
    """The running Python's standard-library sources, in sorted path order, so any machine has a corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, n = [], 0
    for f in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in f.parts[-2] or "site-packages" in f.parts:
            continue
        try:
            s = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(s)
        n += len(s)
        if n >= max_chars:
            break
    if not parts:
        raise UserError(f"no Python sources found under {root}; pass --text PATH")
    return "".join(parts)[:max_chars]


@dataclass(frozen=True)
class Vocab:
    """Characters sorted by code point; ids are positions in `chars`."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def unknown(self, text: str) -> str:
        """The characters of `text` not in the vocabulary, sorted, each once."""
        return "".join(sorted(set(text) - set(self.chars)))

    def ids(self, text: str) -> list[int]:
        unknown = self.unknown(text)
        if unknown:
            raise UserError(f"{len(unknown)} character(s) not in the model's vocabulary: {unknown[:10]!r}; "
                            f"use only characters from the training text")
        index = {ch: i for i, ch in enumerate(self.chars)}
        return [index[ch] for ch in text]

    def encode(self, text: str) -> Tensor:
        return torch.tensor(self.ids(text), dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def split_streams(ids: Tensor, batch: int) -> Tensor:
    """Cuts a 1-D id sequence into `batch` contiguous streams (batch, n), dropping the ragged tail."""
    n = ids.numel() // batch
    if n < 2:
        raise UserError(f"text too short for --batch {batch}: {ids.numel()} characters give "
                        f"{n} per stream; use a smaller --batch or a longer text")
    return ids[: n * batch].view(batch, n)


@dataclass
class Corpus:
    """A text split into a training head and a held-out validation tail."""

    vocab: Vocab
    train: Tensor  # (N_train,) int64
    val: Tensor  # (N_val,) int64

    @classmethod
    def from_text(cls, text: str, val_fraction: float, vocab: Vocab | None = None) -> "Corpus":
        vocab = vocab or Vocab.from_text(text)
        ids = vocab.encode(text)
        n_val = max(2, int(len(ids) * val_fraction))
        if len(ids) - n_val < 4:
            raise UserError(f"text has only {len(ids)} characters; training needs a few hundred at least")
        return cls(vocab, ids[:-n_val], ids[-n_val:])


class StreamBatcher:
    """Walks B contiguous streams in windows of `bptt` steps, the TBPTT order.

    Window k holds inputs streams[:, k*bptt : k*bptt+bptt] and targets shifted by one, so the
    hidden state carried out of window k is exactly the state at the start of window k+1. When a
    pass ends, the walk restarts from the beginning and the state must be reset (`wrapped`).
    """

    def __init__(self, ids: Tensor, batch: int, bptt: int):
        self.streams = split_streams(ids, batch)  # (B, n)
        self.bptt = bptt
        self.windows = (self.streams.shape[1] - 1) // bptt
        if self.windows < 1:
            raise UserError(f"text too short for --bptt {bptt} with --batch {batch}; lower one of them")

    def window(self, k: int) -> tuple[Tensor, Tensor, bool]:
        """Inputs (B, bptt), targets (B, bptt), and whether k starts a new pass (reset the state)."""
        j = k % self.windows
        s = j * self.bptt
        return self.streams[:, s:s + self.bptt], self.streams[:, s + 1:s + 1 + self.bptt], j == 0
