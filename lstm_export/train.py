"""Truncated-BPTT training of the char language model, on one process or many (torchrun + DDP/gloo).

The text is cut into B contiguous streams; training walks them in windows of `bptt` steps and
carries (h, c) from one window into the next, detached, so gradients stop at the window edge
while the state still sees the whole history (the classic hidden-state repackaging).
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lstm_export.common.errors import UserError

from . import checkpoint as ckpt_io
from .charlm import CharLM, sample_id
from .config import ModelConfig, TrainConfig
from .data import Corpus, StreamBatcher

LN2 = math.log(2.0)


@dataclass
class TrainResult:
    """Where a run ended: step, seconds, last losses in nats per character, throughput."""

    out: Path
    step: int
    elapsed_s: float
    train_loss: float
    val_loss: float
    chars_per_s: float
    interrupted: bool = False
    history: list = field(default_factory=list)

    @property
    def val_bpc(self) -> float:
        return self.val_loss / LN2


class _StopFlag:
    """SIGINT/SIGTERM set a flag checked between steps, so a checkpoint never holds a half-applied update."""

    def __init__(self):
        self.raised = False
        self._old = {}

    def __enter__(self):
        if _is_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.raised:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _lr(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """Linear warm-up, then cosine decay over the step or time budget, whichever is nearer its end."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = step / max(cfg.steps, 1)
    if cfg.minutes > 0:
        progress = max(progress, elapsed_s / (cfg.minutes * 60))
    progress = min(progress, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: CharLM, ids: torch.Tensor, max_chars: int = 0, streams: int = 16, window: int = 256) -> float:
    """Mean cross-entropy (nats/char) on held-out ids, walked as `streams` contiguous streams."""
    was_training = model.training
    model.eval()
    if max_chars:
        ids = ids[:max_chars]
    streams = max(1, min(streams, (ids.numel() - 1) // 2))
    n = (ids.numel() - 1) // streams
    x_all = ids[: n * streams].view(streams, n)
    y_all = ids[1: n * streams + 1].view(streams, n)
    state, total, count = None, 0.0, 0
    for s in range(0, n, window):
        logits, state = model(x_all[:, s:s + window], state)
        total += F.cross_entropy(logits.flatten(0, 1), y_all[:, s:s + window].flatten(), reduction="sum").item()
        count += y_all[:, s:s + window].numel()
    model.train(was_training)
    return total / count


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return _Dist(dist.get_rank(), dist.get_world_size())


def train(text: str, model_cfg: ModelConfig, cfg: TrainConfig, out: str | Path,
          resume: ckpt_io.Checkpoint | None = None, progress: bool = True,
          save_all_ranks: bool = False, corpus_path: str | None = None) -> TrainResult:
    """Trains (or resumes) a char LM on `text`, checkpointing atomically to OUT/ckpt.pt.

    Under torchrun (WORLD_SIZE > 1) each rank takes an equal share of the B streams and
    DistributedDataParallel averages gradients over gloo; rank 0 evaluates and writes checkpoints.
    """
    out = Path(out)
    dist_ = _init_distributed()
    torch.manual_seed(cfg.seed)
    vocab = resume.vocab if resume else None
    corpus = Corpus.from_text(text, cfg.val_fraction, vocab)
    model_cfg = replace(model_cfg, vocab_size=len(corpus.vocab))  # the caller's config is not changed
    if cfg.batch % dist_.world:
        raise UserError(f"--batch {cfg.batch} must be divisible by the number of processes ({dist_.world})")
    batcher = StreamBatcher(corpus.train, cfg.batch, cfg.bptt)
    share = cfg.batch // dist_.world
    rows = slice(dist_.rank * share, (dist_.rank + 1) * share)

    model = CharLM(model_cfg, corpus.vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed0, history, hidden = 0, 0.0, [], None
    if resume is not None:
        model.load_state_dict(resume.model_state)
        if resume.optimizer_state:
            optimizer.load_state_dict(resume.optimizer_state)
        step, elapsed0, history = resume.step, resume.elapsed_s, list(resume.history)
        if resume.hidden is not None and dist_.world == 1:
            hidden = tuple(resume.hidden)
        if resume.rng_state is not None:
            torch.set_rng_state(resume.rng_state)
    net = model
    if dist_.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model)

    # where the text came from, so that --resume reads the same one (corpus_path None: the default)
    source = {"path": corpus_path, "sha256": text_sha256(text)}

    def snapshot() -> ckpt_io.Checkpoint:
        return ckpt_io.Checkpoint(model_cfg, cfg, corpus.vocab, model.state_dict(), step, elapsed,
                                  optimizer.state_dict(), hidden, torch.get_rng_state(), history, source)

    if dist_.main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_io.remove_stale_temps(out)  # left by a killed or failed write of an earlier run
    saved_step = resume.step if resume is not None else None

    t0 = time.perf_counter()
    elapsed = elapsed0
    train_loss = val_loss = float("nan")
    chars_done, interrupted = 0, False
    # With a time budget the bar counts seconds (the step budget is then only a ceiling). Where
    # stderr is not a terminal (a log file, CI), one line per evaluation instead of a bar.
    timed = cfg.minutes > 0
    lines = progress and dist_.main and not sys.stderr.isatty()
    bar = tqdm(total=round(cfg.minutes * 60) if timed else cfg.steps, initial=round(elapsed0) if timed else step,
               disable=not (progress and dist_.main) or lines, unit="s" if timed else "step", dynamic_ncols=True,
               desc="train", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}{unit} [{elapsed}<{remaining}{postfix}]"
               if timed else None)
    model.train()
    with _StopFlag() as stop:
        while step < cfg.steps:
            if cfg.minutes > 0 and elapsed >= cfg.minutes * 60:
                break
            x, y, new_pass = batcher.window(step)
            x, y = x[rows], y[rows]  # (b, bptt) this rank's streams
            if new_pass:
                hidden = None
            lr = _lr(cfg, step, elapsed)
            for g in optimizer.param_groups:
                g["lr"] = lr
            logits, state = net(x, hidden)  # (b, bptt, V)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            if _agree_to_stop(not math.isfinite(loss.item()), dist_):  # before the update: weights stay finite
                bar.close()
                kept = (f"the last good checkpoint, {out / 'ckpt.pt'} (step {saved_step}), is kept"
                        if saved_step is not None else "no checkpoint was written")
                raise UserError(f"the training loss became {loss.item()} at step {step + 1}; {kept}. "
                                "Lower --lr (or --clip) and train again")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            hidden = (state[0].detach(), state[1].detach())  # TBPTT: keep the state, cut the graph
            step += 1
            chars_done += x.numel() * dist_.world
            elapsed = elapsed0 + time.perf_counter() - t0
            train_loss = loss.item() if not math.isfinite(train_loss) else 0.9 * train_loss + 0.1 * loss.item()
            stop_now = _agree_to_stop(stop.raised, dist_)
            last = step >= cfg.steps or stop_now or (cfg.minutes > 0 and elapsed >= cfg.minutes * 60)
            if dist_.main and (step % cfg.eval_every == 0 or last):
                val_loss = evaluate(model, corpus.val, cfg.eval_chars)
                history.append({"step": step, "time_s": round(elapsed, 3), "train_loss": train_loss,
                                "val_loss": val_loss, "lr": lr,
                                "chars_per_s": round(chars_done / max(time.perf_counter() - t0, 1e-9))})
                ckpt_io.save(snapshot(), out / "ckpt.pt")
                saved_step = step
                if lines:
                    print(f"step {step}: train loss {train_loss:.3f}, val loss {val_loss:.3f} nats/char, "
                          f"{history[-1]['chars_per_s']:,} chars/s, {elapsed:.0f} s", file=sys.stderr, flush=True)
            if save_all_ranks and last:
                torch.save(model.state_dict(), out / f"weights-rank{dist_.rank}.pt")
            rate = chars_done / max(time.perf_counter() - t0, 1e-9)
            bar.update(min(elapsed, cfg.minutes * 60) - bar.n if timed else 1)
            bar.set_postfix(step=step, loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}", chars_s=f"{rate:,.0f}",
                            refresh=False)
            if stop_now:
                interrupted = True
                break
    bar.close()
    if dist_.world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(out, step, elapsed, train_loss, val_loss,
                       chars_done / max(time.perf_counter() - t0, 1e-9), interrupted, history)


def text_sha256(text: str) -> str:
    import hashlib
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _agree_to_stop(local: bool, d: _Dist) -> bool:
    """Every rank stops at the same step: any rank's stop request is shared with all."""
    if d.world == 1:
        return local
    import torch.distributed as dist
    flag = torch.tensor([1.0 if local else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@torch.no_grad()
def sample(model: CharLM, vocab, prime: str, chars: int, temperature: float = 1.0, seed: int | None = None) -> str:
    """Continues `prime` by `chars` characters; temperature 0 picks the most likely character."""
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    rng = np.random.default_rng(seed)
    model.eval()
    ids = vocab.encode(prime).unsqueeze(0)  # (1, P)
    logits, state = model(ids)
    out = []
    for _ in range(chars):
        nxt = sample_id(logits[0, -1].numpy(), temperature, rng)  # from the last step's (V,) logits
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]]), state)
    return prime + vocab.decode(out)
