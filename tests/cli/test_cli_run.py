"""`lstm-export run` and `compare` from the command line, including every kind of bad input."""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from lstm_export import LSTM
from lstm_export.export import export_onnx


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    torch.manual_seed(0)
    m = LSTM(3, 5, 2, batch_first=True).eval()
    d = tmp_path_factory.mktemp("run")
    return m, export_onnx(m, d / "native.onnx", "native", initial_state=True), d


def _clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_run_with_inputs_matches_torch(cli, native, tmp_path):
    m, path, _ = native
    x, h, c = (
        np.random.default_rng(0).standard_normal(s).astype(np.float32) for s in [(2, 7, 3), (2, 2, 5), (2, 2, 5)]
    )
    np.savez(tmp_path / "in.npz", input=x, h_0=h, c_0=c)
    for rt in ("ort-cpu", "onnx-reference"):
        r = cli("run", path, "--runtime", rt, "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / f"{rt}.npz")
        assert r.returncode == 0, r.stderr
        with np.load(tmp_path / f"{rt}.npz") as out:
            assert list(out.files) == ["output", "h_n", "c_n"]
            with torch.no_grad():
                y, (hn, _) = m(torch.from_numpy(x), (torch.from_numpy(h), torch.from_numpy(c)))
            np.testing.assert_allclose(out["output"], y.numpy(), atol=1e-5)
            np.testing.assert_allclose(out["h_n"], hn.numpy(), atol=1e-5)


def test_run_any_onnx_model_with_random_inputs(cli, tmp_path):
    """Not one of ours: a Conv -> Relu graph with a symbolic batch."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 3], np.ones(6, np.float32).tolist())
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y0"]), helper.make_node("Relu", ["y0"], ["y"])],
                          "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 6])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # as most exporters in the wild write it
    onnx.save(model, tmp_path / "conv.onnx")
    _clean_error(cli("run", tmp_path / "conv.onnx", "--outputs", tmp_path / "o.npz"), "--dim n=N")
    r = cli("run", tmp_path / "conv.onnx", "--outputs", tmp_path / "o.npz", "--dim", "n=4", "--seed", "5")
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "o.npz") as out:
        assert out["y"].shape == (4, 2, 6) and (out["y"] >= 0).all()


def test_run_bad_inputs(cli_here, native, tmp_path):
    _, path, _ = native
    ok = {"input": np.zeros((2, 7, 3), np.float32), "h_0": np.zeros((2, 2, 5), np.float32),
          "c_0": np.zeros((2, 2, 5), np.float32)}
    cases = {
        "missing": ({k: v for k, v in ok.items() if k != "c_0"}, "inputs missing: c_0"),
        "extra": ({**ok, "bogus": np.zeros(1, np.float32)}, "unexpected inputs: bogus"),
        "rank": ({**ok, "input": np.zeros((7, 3), np.float32)}, "input input has rank 2"),
        "dtype": ({**ok, "input": np.zeros((2, 7, 3), np.float64)}, "dtype float64, expected float32"),
        "dim": ({**ok, "input": np.zeros((2, 7, 4), np.float32)}, "dimension 2 = 4, expected 3"),
        "batch": ({**ok, "h_0": np.zeros((2, 3, 5), np.float32)}, "dimension 'batch' is 2 in input but 3 in h_0"),
        "empty batch": ({k: v[:, :0] if k != "input" else v[:0] for k, v in ok.items()}, "input input is empty"),
        "zero steps": ({**ok, "input": np.zeros((2, 0, 3), np.float32)}, "input input is empty"),
        "nan": ({**ok, "input": np.full((2, 7, 3), np.nan, np.float32)}, "holds 42 NaN and 0 Inf values"),
    }
    for name, (feeds, needle) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **feeds)
        r = cli_here("run", path, "--inputs", tmp_path / f"{name}.npz", "--outputs", tmp_path / "o.npz")
        _clean_error(r, needle)
    # NaN is refused by default (runtimes disagree on what it gives: ort-cpu returns finite numbers
    # for an all-NaN input); --allow-nonfinite runs it anyway
    r = cli_here("run", path, "--inputs", tmp_path / "nan.npz", "--outputs", tmp_path / "o.npz", "--allow-nonfinite")
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "o.npz") as z:
        assert z["output"].shape == (2, 7, 5)


def test_run_bad_files_and_names(cli_here, native, tmp_path):
    _, path, _ = native
    (tmp_path / "text.onnx").write_text("not a model")
    (tmp_path / "trunc.onnx").write_bytes(path.read_bytes()[:300])
    _clean_error(cli_here("run", tmp_path / "text.onnx", "--outputs", tmp_path / "o.npz"), "not a valid ONNX model")
    _clean_error(cli_here("run", tmp_path / "trunc.onnx", "--outputs", tmp_path / "o.npz"), "not a valid ONNX model")
    _clean_error(cli_here("run", tmp_path / "none.onnx", "--outputs", tmp_path / "o.npz"), "does not exist")
    _clean_error(cli_here("run", path, "--runtime", "tensorrt", "--outputs", tmp_path / "o.npz"),
                 "unknown runtime 'tensorrt'")
    _clean_error(cli_here("run", path, "--runtime", "torch", "--outputs", tmp_path / "o.npz"), "--checkpoint")
    g = helper.make_graph([helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    custom = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    custom.ir_version = 8
    onnx.save(custom, tmp_path / "custom.onnx")
    _clean_error(cli_here("run", tmp_path / "custom.onnx", "--outputs", tmp_path / "o.npz"), "FancyOp")


def test_ort_errors_lose_their_cxx_boilerplate():
    """ORT's load errors carry a prefix and a C++ source location; what the user reads is the reason.
    (The message is onnxruntime 1.31's for an IR version it cannot read; newer releases read it.)"""
    from lstm_export.runtimes.ort import ort_message
    raw = ("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model.cc:256 "
           "onnxruntime::Model::Model(onnx::ModelProto&&, const onnxruntime::PathString&, const "
           "onnxruntime::IOnnxRuntimeOpSchemaRegistryList*, const onnxruntime::logging::Logger&, const "
           "onnxruntime::ModelOptions&) Unsupported model IR version: 14, max supported IR version: 13\n")
    assert ort_message(Exception(raw)) == "Unsupported model IR version: 14, max supported IR version: 13"
    assert ort_message(Exception("[ONNXRuntimeError] : 1 : FAIL : Fatal error: com.example:FancyOp(-1) is not "
                                 "a registered function/op")) == \
        "Fatal error: com.example:FancyOp(-1) is not a registered function/op"


def test_reference_evaluator_refuses_sequence_lens(cli, tmp_path):
    m = LSTM(3, 4).eval()
    path = export_onnx(m, tmp_path / "len.onnx", "native", lengths=True)
    _clean_error(cli("run", path, "--runtime", "onnx-reference", "--outputs", tmp_path / "o.npz"),
                 "ignores LSTM sequence_lens")


@pytest.mark.parametrize("attrs,named", [({"clip": 0.3}, "clip"), ({"input_forget": 1}, "input_forget"),
                                         ({"activations": ["HardSigmoid", "Tanh", "Tanh"]}, "activations")])
def test_reference_evaluator_refuses_what_it_would_ignore(tmp_path, attrs, named):
    """onnx's reference LSTM ignores these attributes (its numbers differ from ORT's by up to 0.27)."""
    from lstm_export import UserError
    from lstm_export.runtimes.onnx_reference import ReferenceRuntime
    node = helper.make_node("LSTM", ["X", "W", "R"], ["Y"], name="n", hidden_size=2, **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 1, 2])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 1, 1, 2])],
                          [onnx.numpy_helper.from_array(np.zeros((1, 8, 2), np.float32), "W"),
                           onnx.numpy_helper.from_array(np.zeros((1, 8, 2), np.float32), "R")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "m.onnx")
    with pytest.raises(UserError, match=f"ignores LSTM {named}"):
        ReferenceRuntime().prepare(tmp_path / "m.onnx")


def test_compare_passes_and_writes_report_and_plot(cli, native, tmp_path):
    _, path, _ = native
    r = cli("compare", path, "--runtimes", "ort-cpu,onnx-reference", "--dim", "time=12", "--seed", "4",
            "--report", tmp_path / "r.json", "--plot", tmp_path / "r.png", "--tol", "c_n=1e-5:1e-3")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["passed"] and rep["seed"] == 4 and rep["reference"] == "ort-cpu"
    out = {o["name"]: o for o in rep["results"][0]["outputs"]}
    assert len(out["output"]["per_step"]) == 12 and out["h_n"]["per_step"] is None
    assert out["c_n"]["rtol"] == 1e-3
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_finds_a_mismatch(cli, tmp_path, tiny_text):
    """A model exported from one checkpoint, compared with another checkpoint's torch model: exit 1."""
    from dataclasses import replace

    from lstm_export.config import ModelConfig, TrainConfig
    from lstm_export.train import train
    cfg = TrainConfig(bptt=8, batch=4, steps=3, eval_every=3, eval_chars=500)
    for seed in (1, 2):
        train(tiny_text, ModelConfig(embed=4, hidden=8, layers=1), replace(cfg, seed=seed), tmp_path / f"s{seed}",
              progress=False)
    assert cli("export", tmp_path / "s1", "--mode", "native", "--out", tmp_path / "m.onnx").returncode == 0
    # TVM in compare and --long: tests/runtimes/test_tvm.py; here the exit status and the torch rows
    runtimes = ("--runtimes", "ort-cpu,onnx-reference")
    good = cli("compare", tmp_path / "m.onnx", "--checkpoint", tmp_path / "s1", "--dim", "time=6", "--long", "2000",
               *runtimes)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "torch-nn" in good.stdout and "long-sequence fidelity" in good.stdout and "T=2000" in good.stdout
    bad = cli("compare", tmp_path / "m.onnx", "--checkpoint", tmp_path / "s2", "--dim", "time=6", *runtimes)
    assert bad.returncode == 1 and "MISMATCH" in bad.stdout and "FAIL" in bad.stdout
