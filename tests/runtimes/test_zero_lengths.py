"""Zero-length sequences, as ONNX Runtime's own LSTM tests run them (sequence_lens all 0, some 0,
a 0 in the middle of the batch): the outputs of such an entry are zeros and so is its final state.
LSTM, GRU and RNN, both directions, on tvm-llvm's packed kernel and its portable loop, against ORT."""
import numpy as np
import onnx
import pytest

from lstm_export.runtimes.tvm_runtime import TvmLlvmRuntime
from tests.marks import one_fast

from . import lstm_cases, rnn_cases

pytest.importorskip("tvm")
LENS = {"all zero": [0, 0, 0], "some zero": [0, 5, 3], "zero in the middle": [4, 0, 5]}
# the packed kernel (constant weights) both ways, the portable loop (computed weights) one way:
# one compile per case, every LENS variant run on it
CASES = [(op, d, w) for op in ("LSTM", "GRU", "RNN") for d, w in (("bidirectional", False), ("forward", True))]


@pytest.mark.parametrize("op,direction,computed", one_fast(CASES, multi=True))
def test_zero_lengths_match_onnx_runtime(tmp_path, op, direction, computed):
    D = 2 if direction == "bidirectional" else 1
    if op == "LSTM":
        model = lstm_cases.lstm_model(D, direction=direction, computed_weights=computed)
        feeds, oracle = lstm_cases.feeds_for(model, 5, 3, seed=1), lstm_cases.ort_oracle
    else:
        model = rnn_cases.rnn_model(op, D, direction=direction, computed_weights=computed)
        feeds, oracle = rnn_cases.feeds_for(model, 5, 3, seed=1), rnn_cases.ort_outputs
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    names = [o.name for o in model.graph.output]
    with TvmLlvmRuntime(cache=False) as rt:
        rt.prepare(path)
        for case, lens in LENS.items():
            feeds["sequence_lens"] = np.array(lens, np.int32)
            want = oracle(model, feeds)
            empty = [b for b, n in enumerate(lens) if n == 0]
            for name, w in zip(names, want):  # the oracle's answer, as the spec reads: zeros for those entries
                assert np.all(np.take(w, empty, axis=2 if name == "Y" else 1) == 0), name
            got = rt.run(feeds)
            for name, w in zip(names, want):
                np.testing.assert_allclose(got[name], w, rtol=1e-4, atol=1e-5,
                                           err_msg=f"{op} {direction} {case}: {name}")


def test_torch_runtimes_give_onnx_s_zeros_for_an_empty_sequence(tmp_path):
    """Our model and torch.nn.LSTM (which packs no empty sequence) on the exported graph's feeds:
    the same answer as ONNX Runtime on the export, zero-length entries included."""
    import torch

    from lstm_export import LSTM, export_onnx
    from lstm_export.runtimes.base import get_runtime
    torch.manual_seed(0)
    m = LSTM(3, 5, 2, bidirectional=True).eval()
    path = export_onnx(m, tmp_path / "m.onnx", "native", lengths=True, initial_state=True)
    rng = np.random.default_rng(0)
    feeds = {"input": rng.standard_normal((4, 3, 3)).astype(np.float32), "lengths": np.array([0, 4, 2], np.int32),
             "h_0": rng.standard_normal((4, 3, 5)).astype(np.float32),
             "c_0": rng.standard_normal((4, 3, 5)).astype(np.float32)}
    with get_runtime("ort-cpu") as o:
        o.prepare(path)
        want = o.run(feeds)
    for name in ("torch", "torch-nn"):
        with get_runtime(name, model=m) as rt:
            rt.prepare(path)
            got = rt.run(feeds)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=f"{name} {k}")
