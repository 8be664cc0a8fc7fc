"""The CLI boundary: a table of bad inputs, each one line on stderr, exit 2, and nothing on disk
changed. (Numeric flags: test_cli_args.py; feeds: test_cli_run.py; the server: tests/serving.)"""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from lstm_export import LSTM, export_onnx


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    native = export_onnx(LSTM(3, 4).eval(), d / "native.onnx", "native")
    g = helper.make_graph([helper.make_node("Identity", ["s"], ["t"])], "g",
                          [helper.make_tensor_value_info("s", TensorProto.STRING, [2])],
                          [helper.make_tensor_value_info("t", TensorProto.STRING, [2])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), d / "strings.onnx")
    torch.save({"format": "lstm-export-checkpoint", "version": 1, "model": {}}, d / "edited.pt")
    (d / "folder").mkdir()
    return d, native


CASES = {
    "shape with a zero": (["bench", "--shape", "0,1,2,3", "--only-shapes"], "--shape expects"),
    "shape with 3 fields": (["bench", "--shape", "1,2,3", "--only-shapes"], "4 or 5 integers"),
    "shape with 6 fields": (["bench", "--shape", "1,2,3,4,1,1", "--only-shapes"], "4 or 5 integers"),
    "string inputs": (["run", "{d}/strings.onnx", "--outputs", "{d}/o.npz"], "'s' is a string value"),
    "runtimes ','": (["compare", "{native}", "--runtimes", ","], "names no runtime"),
    "huge random input": (["run", "{native}", "--dim", "batch=1000000000000", "--outputs", "{d}/o.npz"],
                          "would take more than"),
    "outputs onto a folder": (["run", "{native}", "--outputs", "{d}/folder"], "it is a folder"),
    "report onto a folder": (["compare", "{native}", "--runtimes", "ort-cpu", "--report", "{d}/folder"],
                             "it is a folder"),
    "export onto a folder": (["export", "{d}/edited.pt", "--out", "{d}/folder"], "is a folder; name the .onnx"),
    "export all onto a file": (["export", "{d}/edited.pt", "--mode", "all", "--out", "{native}"], "is a file"),
    "edited checkpoint": (["sample", "{d}/edited.pt"], "lacks model_config, train_config, vocab, step"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(cli_here, files, case):
    d, native = files
    args, needle = CASES[case]
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*")}
    r = cli_here(*[a.format(d=d, native=native) for a in args])
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*")} == before


def test_the_torch_runtime_on_a_model_it_cannot_run_names_itself(cli_here, files, tmp_path, tiny_text):
    from lstm_export.config import ModelConfig, TrainConfig
    from lstm_export.train import train
    d, native = files
    train(tiny_text, ModelConfig(embed=4, hidden=8, layers=1), TrainConfig(bptt=8, batch=2, steps=1, eval_every=1,
                                                                          eval_chars=100), tmp_path / "lm",
          progress=False)
    np.savez(tmp_path / "in.npz", input=np.zeros((2, 1, 3), np.float32))
    r = cli_here("run", native, "--runtime", "torch", "--checkpoint", tmp_path / "lm", "--inputs", tmp_path / "in.npz",
                 "--outputs", tmp_path / "o.npz")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "torch failed to run" in r.stderr, r.stderr
