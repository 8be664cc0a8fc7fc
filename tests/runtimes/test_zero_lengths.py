"""Zero-length sequences, as ONNX Runtime's own LSTM tests run them (sequence_lens all 0, some 0,
a 0 in the middle of the batch): the outputs of such an entry are zeros and so is its final state.
LSTM, GRU and RNN, both directions, on tvm-llvm's packed kernel and its portable loop, against ORT."""
import numpy as np
import onnx
import pytest

from runtimes.tvm_runtime import TvmLlvmRuntime
from tests.marks import one_fast

from . import lstm_cases, rnn_cases

pytest.importorskip("tvm")
LENS = {"all zero": [0, 0, 0], "some zero": [0, 5, 3], "zero in the middle": [4, 0, 5]}
CASES = [(op, d, k, w) for op in ("LSTM", "GRU", "RNN") for d in ("forward", "bidirectional")
         for k in LENS for w in (False, True)]


@pytest.mark.parametrize("op,direction,lens,computed", one_fast(CASES, multi=True))
def test_zero_lengths_match_onnx_runtime(tmp_path, op, direction, lens, computed):
    D = 2 if direction == "bidirectional" else 1
    if op == "LSTM":
        model = lstm_cases.lstm_model(D, direction=direction, computed_weights=computed)
        feeds = lstm_cases.feeds_for(model, 5, 3, seed=1)
        want = lstm_cases.ort_oracle(model, dict(feeds, sequence_lens=np.array(LENS[lens], np.int32)))
    else:
        model = rnn_cases.rnn_model(op, D, direction=direction, computed_weights=computed)
        feeds = rnn_cases.feeds_for(model, 5, 3, seed=1)
        want = rnn_cases.ort_outputs(model, dict(feeds, sequence_lens=np.array(LENS[lens], np.int32)))
    feeds["sequence_lens"] = np.array(LENS[lens], np.int32)
    empty = [b for b, n in enumerate(LENS[lens]) if n == 0]
    names = [o.name for o in model.graph.output]
    for name, w in zip(names, want):  # the oracle's answer, as the spec reads: zeros for those entries
        assert np.all(np.take(w, empty, axis=2 if name == "Y" else 1) == 0), name
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rt = TvmLlvmRuntime(cache=False)
    rt.prepare(path)
    got = rt.run(feeds)
    rt.release()
    for name, w in zip(names, want):
        np.testing.assert_allclose(got[name], w, rtol=1e-4, atol=1e-5, err_msg=f"{op} {direction} {lens}: {name}")
