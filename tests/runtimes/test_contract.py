"""The shared contract: every registered runtime, on the same inputs, gives the same outputs."""
import numpy as np
import pytest
import torch

from lstm_export import LSTM
from lstm_export.charlm import CharLM
from lstm_export.common.agreement import tolerance_for
from lstm_export.config import ModelConfig
from lstm_export.export import export_onnx
from lstm_export.runtimes import REGISTRY, get_runtime, list_runtimes
from lstm_export.runtimes.model_io import load_onnx, random_feeds

MODEL_RUNTIMES = ("torch", "torch-nn", "numpy-f64")  # run our model object, not the ONNX file


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    lm = CharLM(ModelConfig(vocab_size=13, embed=6, hidden=8, layers=2)).eval()
    d = tmp_path_factory.mktemp("contract")
    return lm, export_onnx(lm, d / "lm.streaming.onnx", "streaming")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_runtime_agrees_with_onnx_runtime(name, exported):
    lm, path = exported
    avail = list_runtimes()[name]
    if not avail:
        pytest.skip(f"{name}: {avail.reason}")
    feeds = random_feeds(load_onnx(path), seed=3, dims={"batch": 2, "time": 9})
    oracle = get_runtime("ort-cpu") if name != "ort-cpu" else get_runtime("onnx-reference")
    with oracle:
        oracle.prepare(path)
        expected = oracle.run(feeds)
    rt = get_runtime(name, model=lm) if name in MODEL_RUNTIMES else get_runtime(name)
    with rt:
        rt.prepare(path)
        got = rt.run(feeds)
    assert list(got) == ["logits", "h_n", "c_n"]
    # a reduced-precision runtime (openvino-default on a bf16 CPU, ort-cpu-int8) is held to its
    # format's tolerance, as compare holds it; everything else to fp32's
    assert rt.precision in ("fp32", "bf16", "fp16", "int8")
    atol, _ = tolerance_for(rt.precision, 2e-5, 0.0)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], atol=atol, err_msg=f"{name} ({rt.precision}): {k}")


def test_listing_gives_a_reason_for_each_unavailable_runtime():
    listing = list_runtimes()
    assert set(listing) == set(REGISTRY)
    for name, a in listing.items():
        assert a.reason and (bool(a) == (a.reason == "available")), (name, a)


def test_ort_cuda_is_refused_without_cuda():
    a = list_runtimes()["ort-cuda"]
    if a:
        pytest.skip("a CUDA device and onnxruntime-gpu are present")
    assert "CUDA" in a.reason


def test_ort_reports_where_each_node_ran_and_refuses_cpu_fallback_as_cuda(tmp_path):
    from lstm_export import UserError
    from lstm_export.runtimes.ort import check_on_cuda
    m = LSTM(3, 4, 2).eval()
    path = export_onnx(m, tmp_path / "n.onnx", "native")
    rt = get_runtime("ort-cpu")
    rt.prepare(path)
    placements = rt.profile_placements({"input": np.zeros((5, 2, 3), np.float32)})
    lstm_nodes = {n: p for n, (op, p) in placements.items() if op == "LSTM"}
    assert len(lstm_nodes) == 2 and set(lstm_nodes.values()) == {"CPUExecutionProvider"}
    with pytest.raises(UserError, match="fell back from CUDA.*LSTM on CPUExecutionProvider"):
        check_on_cuda(placements)
    check_on_cuda({n: (op, "CUDAExecutionProvider") for n, (op, _) in placements.items()})  # all on CUDA: fine


def test_unknown_runtime_named():
    from lstm_export import UserError
    with pytest.raises(UserError, match="unknown runtime 'tensorrt'.*ort-cpu"):
        get_runtime("tensorrt")


def test_openvino_default_says_what_it_computes_in(exported):
    """OpenVINO as it comes takes bf16 on a CPU with bf16 and f32 elsewhere; the pinned runtime f32."""
    avail = list_runtimes()["openvino-default"]
    if not avail:
        pytest.skip(f"openvino-default: {avail.reason}")
    from lstm_export.runtimes.tvm_lstm.target.targets import cpu_flags
    _, path = exported
    with get_runtime("openvino-default") as rt, get_runtime("openvino") as pinned:
        rt.prepare(path)
        pinned.prepare(path)
        assert rt.precision == ("bf16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "fp32")
        assert pinned.precision == "fp32"
