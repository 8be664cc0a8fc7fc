"""The command line: train/sample work, and every kind of bad input gives one line, exit 2, no traceback."""
import pytest
import torch

from lstm_export import checkpoint as ckpt_io

SMALL = ["--embed", "16", "--hidden", "32", "--layers", "1", "--batch", "4", "--bptt", "16", "--quiet"]


def _assert_clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_text):
    from ..conftest import run_cli
    d = tmp_path_factory.mktemp("trained")
    (d / "tiny.txt").write_text(tiny_text)
    r = run_cli("train", "--text", d / "tiny.txt", "--out", d / "run", "--steps", "30", "--eval-every", "15", *SMALL)
    assert r.returncode == 0, r.stderr
    assert "done: step 30" in r.stdout and "bits/char" in r.stdout
    return d


def test_sample_prints_prime_and_continuation(cli, trained):
    r = cli("sample", trained / "run", "--prime", "The quick", "--chars", "40", "--seed", "1")
    assert r.returncode == 0, r.stderr
    out = r.stdout.rstrip("\n")
    assert out.startswith("The quick") and len(out) == len("The quick") + 40
    again = cli("sample", trained / "run" / "ckpt.pt", "--prime", "The quick", "--chars", "40", "--seed", "1")
    assert again.stdout == r.stdout  # seeded sampling is reproducible


def test_resume_continues_and_refuses_changed_hyperparameters(cli, trained, tmp_path):
    import shutil
    shutil.copytree(trained / "run", tmp_path / "run")
    r = cli("train", "--text", trained / "tiny.txt", "--out", tmp_path / "run", "--resume", "--steps", "45", "--quiet")
    assert r.returncode == 0, r.stderr
    assert ckpt_io.load(tmp_path / "run").step == 45
    r = cli("train", "--text", trained / "tiny.txt", "--out", tmp_path / "run", "--resume", "--steps", "60",
            "--hidden", "64", "--lr", "0.1")
    _assert_clean_error(r, "--resume with changed hyper-parameters", "--hidden 64 (checkpoint has 32)", "--lr 0.1")


def test_empty_and_non_utf8_text(cli_here, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc\x80")
    _assert_clean_error(cli_here("train", "--text", tmp_path / "empty.txt", "--out", tmp_path / "o", *SMALL),
                        "is empty")
    _assert_clean_error(cli_here("train", "--text", tmp_path / "bin.txt", "--out", tmp_path / "o", *SMALL), "not UTF-8")


def test_corrupted_and_truncated_checkpoints(cli_here, trained, tmp_path):
    good = (trained / "run" / "ckpt.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 40)
    for name in ("trunc.pt", "noise.pt"):
        _assert_clean_error(cli_here("sample", tmp_path / name), "corrupted or truncated")
    _assert_clean_error(cli_here("sample", tmp_path / "missing.pt"), "does not exist")


def test_checkpoint_from_another_config(cli_here, trained, tmp_path):
    d = torch.load(trained / "run" / "ckpt.pt", weights_only=True)
    d["model_config"]["hidden"] = 64  # the weights are still 32 wide
    torch.save(d, tmp_path / "other.pt")
    _assert_clean_error(cli_here("sample", tmp_path / "other.pt"), "do not match its config")
    torch.save({"state_dict": d["model"]}, tmp_path / "foreign.pt")
    _assert_clean_error(cli_here("sample", tmp_path / "foreign.pt"), "not an lstm-export checkpoint")


def test_prime_with_unseen_characters(cli_here, trained):
    _assert_clean_error(cli_here("sample", trained / "run", "--prime", "Zebra ☃"), "not in the model's vocabulary")


def test_existing_output_needs_resume_and_bad_flags(cli_here, trained, tmp_path):
    _assert_clean_error(cli_here("train", "--text", trained / "tiny.txt", "--out", trained / "run", *SMALL), "--resume")
    _assert_clean_error(cli_here("train", "--config", "nope", "--out", tmp_path / "x"), "unknown config 'nope'")
    _assert_clean_error(
        cli_here("train", "--hidden", "0", "--out", tmp_path / "x"),
        "argument --hidden: must be an integer from 1 to 65536, got 0",
    )
    _assert_clean_error(cli_here("train", "--text", tmp_path / "nope.txt", "--out", tmp_path / "x"), "does not exist")


def test_named_configs_load(cli):
    from lstm_export.config import MODELS_DIR, load_preset
    names = sorted(p.stem for p in MODELS_DIR.glob("*.json"))
    assert {"char-tiny", "char-small", "char-base"} <= set(names)
    for n in names:
        assert load_preset(n)["model"]["layers"] >= 1
