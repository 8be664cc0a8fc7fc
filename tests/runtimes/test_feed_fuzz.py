"""Fuzzed feeds through the runtime contract: every runtime either runs them or refuses them with
one UserError line; nothing crashes, raises anything else, or returns from out-of-range ids."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lstm_export.charlm import CharLM
from lstm_export.common.errors import UserError
from lstm_export.config import ModelConfig
from lstm_export.export import export_onnx
from lstm_export.runtimes.base import get_runtime, list_runtimes

VOCAB = 11


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    torch.manual_seed(0)
    path = export_onnx(CharLM(ModelConfig(vocab_size=VOCAB, embed=4, hidden=8, layers=1)).eval(),
                       tmp_path_factory.mktemp("fuzz") / "lm.onnx", "native", initial_state=True)
    names = [n for n in ("ort-cpu", "onnx-reference", "tvm-llvm", "openvino") if list_runtimes()[n]]
    rts = [get_runtime(n) for n in names]
    for rt in rts:
        rt.prepare(path)
    yield rts
    for rt in rts:
        rt.release()


ids = st.integers(-2**40, 2**40) | st.integers(-1, VOCAB)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.floats(-3, 3, width=32)


@st.composite
def feeds(draw):
    b, t = draw(st.integers(0, 3)), draw(st.integers(0, 4))
    tok_dtype = draw(st.sampled_from([np.int64, np.int64, np.int32, np.float32]))
    tokens = np.array(draw(st.lists(ids, min_size=b * t, max_size=b * t)), dtype=np.int64).reshape(b, t)
    state_shape = draw(st.sampled_from([(1, b, 8), (1, b, 8), (1, max(b, 1) + 1, 8), (b, 8)]))
    n = int(np.prod(state_shape))
    h = np.array(draw(st.lists(floats, min_size=n, max_size=n)), np.float32).reshape(state_shape)
    out = {"tokens": tokens.astype(tok_dtype), "h_0": h, "c_0": np.zeros(state_shape, np.float32)}
    drop = draw(st.sampled_from([None, None, "c_0"]))
    return {k: v for k, v in out.items() if k != drop}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(f=feeds())
@example(f={"tokens": np.array([[0, 10, 3]]), "h_0": np.zeros((1, 1, 8), np.float32),
            "c_0": np.ones((1, 1, 8), np.float32)})  # valid: all runtimes run it
@example(f={"tokens": np.array([[0, 11, 3]]), "h_0": np.zeros((1, 1, 8), np.float32),
            "c_0": np.ones((1, 1, 8), np.float32)})  # one id past the table: TVM would read past it
def test_fuzzed_feeds_run_or_are_refused_in_one_line(prepared, f):
    tok = f["tokens"]
    valid = (tok.dtype == np.int64 and tok.size and 0 <= tok.min() and tok.max() < VOCAB and "c_0" in f
             and f["h_0"].shape == (1, tok.shape[0], 8) and np.isfinite(f["h_0"]).all())
    for rt in prepared:
        try:
            out = rt.run(f)
        except UserError as e:
            assert not valid, f"{rt.name} refused valid feeds: {e}"
            assert "\n" not in str(e) and str(e)
        else:
            assert valid, f"{rt.name} ran feeds the contract should refuse: { {k: v.shape for k, v in f.items()} }"
            assert out["logits"].shape == (*tok.shape, VOCAB) and np.isfinite(out["logits"]).all()
