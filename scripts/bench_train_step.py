"""Training-step speed: forward + backward of lstm_export.LSTM (native kernel and autograd path) and
LayerNormLSTM against torch.nn.LSTM, interleaved in one process -> benchmarks/train_step_<cpu>.{json,md,png}.

Usage: .venv/bin/python scripts/bench_train_step.py [--shape T128,B64,I512,H512,L2 ...] [--rounds N]
"""
import argparse
import sys

from lstm_export.harness.bench_report import machine_slug
from lstm_export.harness.train_bench import SHAPES, bench_training, plot

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", action="append", help="T..,B..,I..,H..,L.. (repeatable; default: the three below)")
    ap.add_argument("--rounds", type=int, help="timed rounds per shape (default: about 20 s of torch.nn.LSTM)")
    ap.add_argument("--out", help="results prefix (default benchmarks/train_step_<cpu>)")
    args = ap.parse_args()
    report = bench_training(args.shape or SHAPES, rounds=args.rounds)
    out = args.out or f"benchmarks/train_step_{machine_slug()}"
    report.to_json(f"{out}.json")
    plot(report, f"{out}.png")
    text = report.markdown() + "\n\nCommand: `" + " ".join([".venv/bin/python scripts/bench_train_step.py",
                                                            *sys.argv[1:]]) + "`\n"
    with open(f"{out}.md", "w") as f:
        f.write(text)
    print(text)
