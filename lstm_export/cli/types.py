"""The command line's argument boundary: typed converters for numeric flags, and one-line errors.

Every numeric flag of every command is parsed by one of these, so a bad value (`--lr nan`,
`--max-batch 0`, `--port 99999`, `--hidden 1e9`, `--minutes -1`) stops the command before any
work starts, with one line that names the flag's rule, and exit status 2. Commands then check only
what depends on several flags or on files; the output checks every command makes before its work
are here too (check_out_folder, check_writable).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from lstm_export.common.errors import UserError


def count(low: int = 0, high: int | None = None):
    """An integer in [low, high] (high: None for no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text}")
        return value
    return parse


def real(low: float | None = None, high: float | None = None, low_open: bool = False):
    """A finite float in [low, high] ((low, high] with low_open); NaN and infinities are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        below = low is not None and (value <= low if low_open else value < low)
        if below or (high is not None and value > high):
            lo = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
            hi = "" if high is None else f"<= {high:g}"
            raise argparse.ArgumentTypeError(f"must be {' and '.join(p for p in (lo, hi) if p)}, got {text}")
        return value
    return parse


SEED = count(0, 2**32 - 1)  # what torch and NumPy accept
PORT = count(0, 65535)  # 0: any free port


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (`lstm-export train: error: argument --lr: ...`), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _nearest_existing(path: Path) -> Path:
    return next((p for p in [path, *path.parents] if p.exists()), Path("."))


def check_out_folder(out: Path) -> None:
    """Before any work: an output folder must be a folder (or not exist yet) in a place we may
    write. Found after the work (a compile, training up to its first checkpoint), it cost that work."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a folder")
    parent = _nearest_existing(out)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {parent} is not writable; choose another folder")


def check_writable(*paths) -> None:
    """Output files (None: not asked for) are checked before the work, not found unwritable after it."""
    for p in map(Path, filter(None, paths)):
        parent = _nearest_existing(p.parent)
        if p.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
            raise UserError(f"cannot write {p}: {'it is a folder' if p.is_dir() else 'not writable'}; "
                            "choose another path")


# NAME=VALUE flags (repeatable): parsed here, where the command line is, once per command

def parse_dims(items: list[str] | None) -> dict[str, int]:
    """--dim name=value pairs."""
    dims = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise UserError(f"--dim expects name=positive_int, got {item!r}")
        dims[name.strip()] = int(value)
    return dims


def parse_input_shapes(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    """--input-shape NAME=1x512 pairs (dims joined by x or commas; like OpenVINO's reshape and
    onnxsim's --overwrite-input-shape)."""
    shapes = {}
    for item in items or []:
        name, sep, value = item.rpartition("=")
        dims = value.replace(",", "x").split("x") if value else []
        if not sep or not name.strip() or not dims or not all(d.strip().isdigit() for d in dims):
            raise UserError(f"--input-shape expects NAME=D1xD2x... (e.g. input=1x512), got {item!r}")
        shapes[name.strip()] = tuple(int(d) for d in dims)
    return shapes


def parse_input_values(items: list[str] | None) -> dict[str, float]:
    """--input-value NAME=NUMBER pairs (a scalar input fixed to one value, e.g. sr=16000)."""
    values = {}
    for item in items or []:
        name, sep, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name.strip() or number is None:
            raise UserError(f"--input-value expects NAME=NUMBER (e.g. sr=16000), got {item!r}")
        values[name.strip()] = int(number) if number.is_integer() else number
    return values
