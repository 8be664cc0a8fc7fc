"""Training reports: a JSON summary and a PNG of train/validation loss over time."""
from __future__ import annotations

import json
from pathlib import Path

from lstm_export.common.machine import cpu_name
from lstm_export.common.plotting import figure

from .checkpoint import Checkpoint


def plot_history(history: list[dict], path: str | Path, title: str = "", target: float | None = None) -> None:
    """Train and validation loss (nats/char) against wall-clock minutes, with an optional goal line."""
    t = [h["time_s"] / 60 for h in history]
    with figure(path) as (_, ax):
        ax.plot(t, [h["train_loss"] for h in history], label="train (smoothed)")
        ax.plot(t, [h["val_loss"] for h in history], label="validation", marker="o", markersize=3)
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"goal {target:.2f}")
        ax.set_xlabel("minutes")
        ax.set_ylabel("loss (nats/char)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()


def write_training_report(ck: Checkpoint, prefix: str | Path, command: str, chars_per_s: float) -> dict:
    """Writes PREFIX.json and PREFIX.png for a finished training run; returns the summary."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    last = ck.history[-1] if ck.history else {}
    summary = {
        "command": command, "machine": cpu_name(), "step": ck.step, "minutes": round(ck.elapsed_s / 60, 2),
        "final_train_loss": last.get("train_loss"), "final_val_loss": last.get("val_loss"),
        "best_val_loss": min((h["val_loss"] for h in ck.history), default=None),
        "chars_per_s": round(chars_per_s), "model": vars(ck.model_config), "train": vars(ck.train_config),
        "history": ck.history,
    }
    prefix.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_history(
        ck.history,
        prefix.with_suffix(".png"),
        f"char LM {ck.model_config.layers}x{ck.model_config.hidden}: val {last.get('val_loss', 0):.3f} nats/char",
        target=1.60,
    )
    return summary


def _main(argv: list[str]) -> None:
    """python -m lstm_export.report CKPT PREFIX COMMAND: report a finished run from its checkpoint."""
    from . import checkpoint as ckpt_io
    ck_path, prefix, command = argv[:3]
    ck = ckpt_io.load(ck_path)
    rates = [h["chars_per_s"] for h in ck.history if "chars_per_s" in h]
    if not rates:
        raise SystemExit(f"{ck_path} records no throughput (a checkpoint from before it was saved); retrain")
    summary = write_training_report(ck, prefix, command, float(rates[-1]))
    print(f"report: val {summary['final_val_loss']:.4f} nats/char after {summary['minutes']} min, "
          f"{summary['chars_per_s']:,} chars/s -> {prefix}.json, {prefix}.png")


if __name__ == "__main__":
    import sys
    _main(sys.argv[1:])
