"""Sequence lengths through the runtime contract: [0, T] on every runtime, one answer everywhere.
ORT refuses lengths past T while TVM and OpenVINO ran them: the contract refuses those (and negative
ones) before any backend runs. A length of 0 is valid (the ONNX spec and ORT run it: zeros out, a
zero final state). Oracle: ORT."""
import numpy as np
import pytest
import torch

from lstm_export import LSTM, export_onnx
from lstm_export.common.errors import UserError
from lstm_export.runtimes.base import get_runtime, list_runtimes

RUNTIMES = [n for n in ("ort-cpu", "tvm-llvm", "openvino") if list_runtimes()[n]]


@pytest.fixture(scope="module", params=[False, pytest.param(True, marks=pytest.mark.slow)],
                ids=["time-major", "batch-first"])
def model(request, tmp_path_factory):
    torch.manual_seed(0)
    m = LSTM(3, 5, 1, bidirectional=True, batch_first=request.param).eval()
    path = export_onnx(m, tmp_path_factory.mktemp("lens") / "m.onnx", "native", lengths=True)
    rts = [get_runtime(n) for n in RUNTIMES]
    for rt in rts:
        rt.prepare(path)
    yield request.param, rts
    for rt in rts:
        rt.release()


@pytest.mark.parametrize("lens,ok", [([4, 1, 2], True), ([0, 2, 4], True), ([2, 0, 4], True), ([0, 0, 0], True),
                                     ([5, 1, 1], False), ([-1, 2, 3], False)])
def test_lengths_outside_zero_to_t_are_refused_by_every_runtime(model, lens, ok):
    batch_first, rts = model
    x = np.random.default_rng(0).standard_normal((3, 4, 3) if batch_first else (4, 3, 3)).astype(np.float32)
    feeds = {"input": x, "lengths": np.array(lens, np.int32)}
    outs = {}
    for rt in rts:
        if ok:
            outs[rt.name] = rt.run(feeds)
        else:
            with pytest.raises(UserError, match=r"sequence lengths .* outside \[0, 4\]"):
                rt.run(feeds)
    # OpenVINO (2026.4) runs the reverse direction of unequal lengths from the padded end, unlike ONNX
    # Runtime and torch's packed sequences: its numbers are not compared here (compare reports them)
    for name, got in outs.items():
        if name != "openvino":
            for k, v in got.items():
                np.testing.assert_allclose(v, outs["ort-cpu"][k], rtol=1e-4, atol=1e-5, err_msg=f"{name} {k}")
