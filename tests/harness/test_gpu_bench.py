"""The GPU benchmark's halves that run anywhere: the shared weights, the CUDA artifacts, the report."""
import shutil

import numpy as np
import pytest
import torch

from lstm_export.harness import gpu_bench


def test_drawn_weights_give_torch_and_onnx_the_same_lstm(tmp_path):
    """params() in ONNX gate order -> torch.nn.LSTM (float64, the oracle) and -> our exported ONNX
    graph, run by ONNX Runtime: the GPU side rebuilds its peers from the same draw."""
    ort = pytest.importorskip("onnxruntime")
    from lstm_export.export import export_onnx
    w, r, b = gpu_bench.params(24)
    assert [a.shape for a in (w, r, b)] == [(96, 24), (96, 24), (192,)]
    np.testing.assert_array_equal(w, gpu_bench.params(24)[0])  # a fixed draw
    oracle = gpu_bench._torch_lstm(w, r, b, "float64", "cpu")
    path = export_onnx(gpu_bench._ours(gpu_bench._torch_lstm(w, r, b, "float32", "cpu")), tmp_path / "m.onnx", "native")
    x = np.random.default_rng(0).standard_normal((6, 3, 24)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        want = oracle(torch.from_numpy(x).double())[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_prepare_compiles_cuda_artifacts_here(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH")
    pytest.importorskip("tvm", reason="apache-tvm is not installed")
    (d,) = gpu_bench.prepare(tmp_path, hiddens=(16,))
    assert (d / "model.so").stat().st_size > 0 and (d / "weights.json").is_file()


def test_run_without_a_cuda_device_says_where_to_run_it(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: run `./scripts/bench_gpu.sh run DIR` instead")
    assert gpu_bench.main(["run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device here" in err and "prepare DIR" in err


def test_markdown_names_the_device_and_every_status():
    report = {
        "device": "NVIDIA H100 80GB HBM3",
        "torch": "2.11",
        "cudnn": 91900,
        "steps": 64,
        "tvm_runtime": "0.27",
        "timings": [
            {
                "entry": "torch.nn.LSTM cuDNN",
                "hidden": 256,
                "batch": 1,
                "median_us": 826.3,
                "p90_us": 988.4,
                "us_per_step": 12.91,
                "ratio_to_best_peer": 1.0,
                "max_err": 2.2e-7,
                "status": "ok",
            },
            {"entry": "ort-cuda native", "hidden": 256, "batch": 1, "status": "unavailable: no EP"},
        ],
    }
    md = gpu_bench.markdown(report)
    assert md.startswith("Device: NVIDIA H100 80GB HBM3;") and "TF32 off" in md
    assert "| 256 | 1 | torch.nn.LSTM cuDNN | 826.3 | 988.4 | 12.91 | 1.00 | 2.2e-07 | ok |" in md
    assert "| 256 | 1 | ort-cuda native | - | - | - | - | - | unavailable: no EP |" in md
