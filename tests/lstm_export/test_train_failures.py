"""Training when things go wrong: a loss that stops being finite, a resume without --text, an
unwritable --out, a full disk, and what killed writes left behind. Oracle: the checkpoint on disk."""
import errno
import os

import pytest
import torch

from lstm_export import checkpoint as ckpt_io
from lstm_export import train as train_mod
from lstm_export.common.errors import UserError
from lstm_export.config import ModelConfig, TrainConfig

SMALL = ["--embed", "8", "--hidden", "16", "--layers", "1", "--batch", "4", "--bptt", "8", "--quiet"]
CFG = TrainConfig(bptt=8, batch=4, steps=20, eval_every=3, eval_chars=300)


def test_a_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, tiny_text, monkeypatch):
    real, calls = train_mod.F.cross_entropy, []

    def blows_up_at_step_6(*a, **kw):
        loss = real(*a, **kw)
        if kw.get("reduction") != "sum":  # training steps (evaluation sums)
            calls.append(1)
            if len(calls) >= 6:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_mod.F, "cross_entropy", blows_up_at_step_6)
    with pytest.raises(UserError, match=r"loss became nan at step 6; the last good checkpoint, .*ckpt.pt \(step 3\)"):
        train_mod.train(tiny_text, ModelConfig(embed=8, hidden=16, layers=1), CFG, tmp_path / "run", progress=False)
    ck = ckpt_io.load(tmp_path / "run")
    assert ck.step == 3 and all(torch.isfinite(v).all() for v in ck.model_state.values())


def test_resume_reads_the_text_the_run_used_and_refuses_another(cli_here, tmp_path, tiny_text):
    text = tmp_path / "corpus.txt"
    text.write_text(tiny_text)
    out = tmp_path / "run"
    assert cli_here("train", "--text", text, "--out", out, "--steps", "4", "--eval-every", "2", *SMALL).returncode == 0
    r = cli_here("train", "--out", out, "--resume", "--steps", "6", "--quiet")  # the command printed after SIGINT
    assert r.returncode == 0, r.stderr
    assert ckpt_io.load(out).step == 6 and ckpt_io.load(out).corpus["path"] == str(text.resolve())
    text.write_text(tiny_text + "more")
    r = cli_here("train", "--out", out, "--resume", "--steps", "8", "--quiet")
    assert r.returncode == 2 and "is not the text" in r.stderr and str(text.resolve()) in r.stderr
    assert ckpt_io.load(out).step == 6


def test_out_is_checked_before_training_and_stale_temps_are_removed(cli_here, tmp_path, tiny_text):
    text = tmp_path / "corpus.txt"
    text.write_text(tiny_text)
    (tmp_path / "file").write_text("keep")
    r = cli_here("train", "--text", text, "--out", tmp_path / "file", *SMALL)
    assert r.returncode == 2 and "is a file" in r.stderr and (tmp_path / "file").read_text() == "keep"
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".ckpt.pt.x1y2.tmp"  # what a killed write leaves
    stale.write_bytes(b"\0" * 1000)
    (out / "notes.tmp").write_text("mine")  # not ours: left alone
    assert cli_here("train", "--text", text, "--out", out, "--steps", "2", *SMALL).returncode == 0
    assert not stale.exists() and (out / "notes.tmp").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: a read-only folder is writable")
def test_a_read_only_out_is_refused_before_training(cli_here, tmp_path, tiny_text):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    r = cli_here("train", "--out", ro / "run", "--steps", "2", *SMALL)
    assert r.returncode == 2 and "not writable" in r.stderr


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("unexpected pos 755456 vs 755344")])
def test_a_full_disk_is_named_and_leaves_no_temp(tmp_path, monkeypatch, failure):
    import shutil
    from collections import namedtuple
    ck = ckpt_io.Checkpoint(ModelConfig(vocab_size=3, embed=2, hidden=2, layers=1), CFG, ckpt_io.Vocab("abc"), {})

    def full(*a, **kw):
        raise failure

    monkeypatch.setattr(ckpt_io.torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10, 10, 0))
    with pytest.raises(UserError, match="no space left on the device writing"):
        ckpt_io.save(ck, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []
