"""The `lstm-export` command line. Exit status: 0 success, 1 a comparison mismatch, 2 bad input or usage."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from lstm_export.common.errors import UserError

from .types import SEED, OneLineParser, check_out_folder, count, real

# Flags of `train` that map onto ModelConfig / TrainConfig fields (flag name -> field name).
MODEL_FLAGS = {"embed": "embed", "hidden": "hidden", "layers": "layers", "dropout": "dropout", "cell": "cell"}
TRAIN_FLAGS = {"bptt": "bptt", "batch": "batch", "lr": "lr", "steps": "steps", "minutes": "minutes",
               "seed": "seed", "eval_every": "eval_every", "clip": "clip", "weight_decay": "weight_decay",
               "warmup": "warmup"}
# Training fields that may change on --resume; changing any other one is refused.
RESUMABLE_CHANGES = {"steps", "minutes", "eval_every", "eval_chars"}


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="named config in models/ (e.g. char-small); flags override it")
    p.add_argument("--text", default=None, help="UTF-8 training text (default: this Python's stdlib sources)")
    p.add_argument("--out", default="runs/char", help="output folder for ckpt.pt (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("model (override the config)")
    g.add_argument("--embed", type=count(1, 65536))
    g.add_argument("--hidden", type=count(1, 65536))
    g.add_argument("--layers", type=count(1, 64))
    g.add_argument("--dropout", type=real(0, 1))
    g.add_argument("--cell", choices=["lstm", "layernorm"])
    g = p.add_argument_group("training (override the config)")
    g.add_argument("--bptt", type=count(1, 100_000), help="truncated-BPTT window length")
    g.add_argument("--batch", type=count(1, 100_000), help="number of contiguous streams")
    g.add_argument("--lr", type=real(0, 10, low_open=True))
    g.add_argument("--steps", type=count(1), help="stop after this many steps")
    g.add_argument("--minutes", type=real(0), help="stop after this many minutes (0: no limit)")
    g.add_argument("--seed", type=SEED)
    g.add_argument("--eval-every", type=count(1))
    g.add_argument("--clip", type=real(0, low_open=True), help="gradient-norm clip")
    g.add_argument("--weight-decay", type=real(0))
    g.add_argument("--warmup", type=count(0))
    p.add_argument("--save-all-ranks", action="store_true", help=argparse.SUPPRESS)


def _positive(args, names) -> None:
    for n in names:
        v = getattr(args, n, None)
        if v is not None and v <= 0:
            raise UserError(f"--{n.replace('_', '-')} must be positive, got {v}")


def _configs_from_args(args):
    from lstm_export.config import ModelConfig, TrainConfig, load_preset
    preset = load_preset(args.config) if args.config else {"model": {}, "train": {}}
    model_cfg = ModelConfig(**preset.get("model", {}))
    train_cfg = TrainConfig(**preset.get("train", {}))
    given_model = {f: getattr(args, a) for a, f in MODEL_FLAGS.items() if getattr(args, a) is not None}
    given_train = {f: getattr(args, a) for a, f in TRAIN_FLAGS.items() if getattr(args, a) is not None}
    return replace(model_cfg, **given_model), replace(train_cfg, **given_train), given_model, given_train


def cmd_train(args) -> int:
    from lstm_export import checkpoint as ckpt_io
    from lstm_export.data import default_corpus, read_text
    from lstm_export.train import text_sha256, train
    _positive(args, ["embed", "hidden", "layers", "bptt", "batch", "lr", "steps", "eval_every", "clip"])
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    model_cfg, train_cfg, given_model, given_train = _configs_from_args(args)
    out = Path(args.out)
    resume = None
    if args.resume:
        resume = ckpt_io.load(out / "ckpt.pt")
        if args.config:
            raise UserError("--resume takes its config from the checkpoint; drop --config")
        changed = [f"--{k.replace('_', '-')} {v} (checkpoint has {getattr(resume.model_config, k)})"
                   for k, v in given_model.items() if getattr(resume.model_config, k) != v]
        changed += [f"--{k.replace('_', '-')} {v} (checkpoint has {getattr(resume.train_config, k)})"
                    for k, v in given_train.items()
                    if k not in RESUMABLE_CHANGES and getattr(resume.train_config, k) != v]
        if changed:
            raise UserError(f"--resume with changed hyper-parameters: {', '.join(changed)}; "
                            "drop those flags or train into a new --out folder")
        model_cfg = resume.model_config
        train_cfg = replace(resume.train_config, **{k: v for k, v in given_train.items() if k in RESUMABLE_CHANGES})
        if resume.step >= train_cfg.steps:
            raise UserError(f"checkpoint is already at step {resume.step} >= --steps {train_cfg.steps}; "
                            "pass a larger --steps to continue")
    elif (out / "ckpt.pt").exists():
        raise UserError(f"{out / 'ckpt.pt'} exists; pass --resume to continue it or choose another --out")
    check_out_folder(out)
    text_path = args.text
    if resume is not None and resume.corpus and text_path is None:
        text_path = resume.corpus.get("path")  # resume reads the text the run trained on
    text = read_text(text_path) if text_path else default_corpus()
    if resume is not None and resume.corpus and text_sha256(text) != resume.corpus.get("sha256"):
        what, original = text_path or "the default corpus", resume.corpus.get("path") or "(the default corpus)"
        raise UserError(f"{what} is not the text {out / 'ckpt.pt'} was trained on (its sha256 differs); "
                        f"resume with the original: {original}")
    res = train(text, model_cfg, train_cfg, out, resume=resume, progress=not args.quiet,
                save_all_ranks=args.save_all_ranks, corpus_path=str(Path(text_path).resolve()) if text_path else None)
    if int(os.environ.get("RANK", "0")) == 0:
        state = "interrupted" if res.interrupted else "done"
        print(f"{state}: step {res.step}, {res.elapsed_s:.1f} s, train {res.train_loss:.4f} nats/char, "
              f"val {res.val_loss:.4f} nats/char ({res.val_bpc:.3f} bits/char), {res.chars_per_s:,.0f} chars/s; "
              f"checkpoint {out / 'ckpt.pt'}")
    if res.interrupted:
        print(f"resume with: lstm-export train --out {out} --resume", file=sys.stderr)
        return 130
    return 0


def cmd_sample(args) -> int:
    from lstm_export import checkpoint as ckpt_io
    from lstm_export.train import sample
    ck = ckpt_io.load(args.checkpoint)
    model = ck.build_model()
    prime = args.prime if args.prime is not None else ck.vocab.chars[0]
    if not prime:
        raise UserError("--prime must not be empty")
    print(sample(model, ck.vocab, prime, args.chars, args.temperature, args.seed))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(Path(args.out), minutes=args.minutes, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    from lstm_export import __version__
    parser = OneLineParser(prog="lstm-export", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lstm-export {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a char language model with truncated BPTT")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("checkpoint", help="ckpt.pt or the folder that holds it")
    p.add_argument("--prime", default=None, help="text to start from (default: the first vocabulary character)")
    p.add_argument("--chars", type=count(0, 1_000_000), default=200)
    p.add_argument("--temperature", type=real(1e-3, 100), default=0.8, help="from 0.001 to 100 (default: %(default)s)")
    p.add_argument("--seed", type=SEED, default=None)
    p.set_defaults(func=cmd_sample)

    from .commands import add_commands
    add_commands(sub)
    from .serve import add_command as add_serve
    add_serve(sub)

    p = sub.add_parser("demo", help="the whole pipeline on a small model, in a few minutes")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--minutes", type=real(0, 24 * 60, low_open=True), default=1.0,
                   help="training time (default: %(default)s)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"lstm-export {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"lstm-export {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
