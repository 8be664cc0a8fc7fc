"""TBPTT training: it learns, it is deterministic, resume is exact, checkpoints survive crashes."""
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace

import pytest
import torch

from lstm_export import checkpoint as ckpt_io
from lstm_export.config import ModelConfig, TrainConfig
from lstm_export.train import sample, train

from ..conftest import REPO, SHARED_DATA

TINY_MODEL = ModelConfig(embed=16, hidden=48, layers=2, dropout=0.1)
TINY_TRAIN = TrainConfig(bptt=16, batch=8, lr=1e-2, steps=40, eval_every=20, eval_chars=2000, warmup=5)


def _unigram_nats(train_text: str, val_text: str) -> float:
    """Cross-entropy of a character-frequency model: the baseline any trained LM must beat."""
    counts = Counter(train_text)
    total = sum(counts.values())
    return -sum(math.log(counts.get(ch, 0.5) / total) for ch in val_text) / len(val_text)


def test_training_beats_unigram_baseline(tmp_path, tiny_text):
    cfg = replace(TINY_TRAIN, steps=120, eval_every=60)
    res = train(tiny_text, replace(TINY_MODEL), cfg, tmp_path, progress=False)
    n_val = int(len(tiny_text) * cfg.val_fraction)
    baseline = _unigram_nats(tiny_text[:-n_val], tiny_text[-n_val:])
    assert res.val_loss < baseline - 0.3, (res.val_loss, baseline)
    assert [h["step"] for h in res.history] == [60, 120]
    ck = ckpt_io.load(tmp_path / "ckpt.pt")
    assert ck.step == 120 and ck.vocab.chars == "".join(sorted(set(tiny_text)))


@pytest.mark.slow
def test_same_seed_same_weights(tmp_path, tiny_text):
    a = train(tiny_text, replace(TINY_MODEL), TINY_TRAIN, tmp_path / "a", progress=False)
    b = train(tiny_text, replace(TINY_MODEL), TINY_TRAIN, tmp_path / "b", progress=False)
    sa, sb = ckpt_io.load(a.out / "ckpt.pt").model_state, ckpt_io.load(b.out / "ckpt.pt").model_state
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = train(tiny_text, replace(TINY_MODEL), replace(TINY_TRAIN, seed=7), tmp_path / "c", progress=False)
    sc = ckpt_io.load(c.out / "ckpt.pt").model_state
    assert not torch.equal(sa["head.weight"], sc["head.weight"])


def test_resume_is_exact(tmp_path, tiny_text):
    """40 steps straight equal 20 steps + resume to 40 (constant lr so the schedule cannot differ)."""
    cfg = replace(TINY_TRAIN, warmup=0, min_lr_ratio=1.0)
    train(tiny_text, replace(TINY_MODEL), cfg, tmp_path / "straight", progress=False)
    train(tiny_text, replace(TINY_MODEL), replace(cfg, steps=20), tmp_path / "split", progress=False)
    first = ckpt_io.load(tmp_path / "split" / "ckpt.pt")
    assert first.step == 20
    train(tiny_text, first.model_config, replace(first.train_config, steps=40), tmp_path / "split",
          resume=first, progress=False)
    s1 = ckpt_io.load(tmp_path / "straight" / "ckpt.pt").model_state
    s2 = ckpt_io.load(tmp_path / "split" / "ckpt.pt").model_state
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k


def test_failed_write_leaves_old_checkpoint_intact(tmp_path, tiny_text, monkeypatch):
    train(tiny_text, replace(TINY_MODEL), replace(TINY_TRAIN, steps=20), tmp_path, progress=False)
    before = (tmp_path / "ckpt.pt").read_bytes()
    ck = ckpt_io.load(tmp_path / "ckpt.pt")

    def crash(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.save(ck, tmp_path / "ckpt.pt")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def _start_training(tmp_path, text_file, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "lstm_export.cli", "train", "--text", str(text_file),
                             "--out", str(tmp_path / "run"), "--embed", "16", "--hidden", "32", "--layers", "1",
                             "--batch", "4", "--bptt", "16", "--steps", "100000", "--eval-every", "5", "--quiet",
                             *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.2)
    time.sleep(1.0)  # let a few more checkpoints be written


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_leaves_a_loadable_checkpoint(tmp_path, tiny_text_file, sig):
    proc = _start_training(tmp_path, tiny_text_file)
    ckpt = tmp_path / "run" / "ckpt.pt"
    _wait_for(ckpt, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:  # graceful: finishes the step, saves, says how to resume
        assert proc.returncode == 130, err
        assert "--resume" in err and "Traceback" not in err
    ck = ckpt_io.load(ckpt)
    assert ck.step > 0
    model = ck.build_model()
    assert len(sample(model, ck.vocab, "The", 20, 1.0, seed=0)) == 23


@pytest.mark.slow
def test_two_process_ddp_ends_with_equal_weights(tmp_path, tiny_text_file, tiny_text):
    """torchrun with 2 gloo processes: both ranks hold the same weights, which also match one process
    on the full batch (DDP averages the per-rank mean gradients)."""
    args = ["--text", str(tiny_text_file), "--embed", "16", "--hidden", "32", "--layers", "1", "--batch", "8",
            "--bptt", "16", "--steps", "12", "--eval-every", "6", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "lstm_export.cli", "train", *args, "--out", str(tmp_path / "ddp"), "--save-all-ranks"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    w0 = torch.load(tmp_path / "ddp" / "weights-rank0.pt")
    w1 = torch.load(tmp_path / "ddp" / "weights-rank1.pt")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    single = subprocess.run([sys.executable, "-m", "lstm_export.cli", "train", *args, "--out", str(tmp_path / "one")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    w = ckpt_io.load(tmp_path / "one" / "ckpt.pt").model_state
    for k in w0:
        torch.testing.assert_close(w0[k], w[k], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_tinyshakespeare_learns_when_present(tmp_path):
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"no corpus: {path} is absent")
    text = path.read_text(encoding="utf-8")[:120_000]
    cfg = replace(TINY_TRAIN, steps=80, eval_every=80, batch=16, bptt=32, eval_chars=0)
    res = train(text, replace(TINY_MODEL, dropout=0.0), cfg, tmp_path, progress=False)
    n_val = int(len(text) * cfg.val_fraction)
    assert res.val_loss < _unigram_nats(text[:-n_val], text[-n_val:]) - 0.2
