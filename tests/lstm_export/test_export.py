"""ONNX export: every mode and option agrees with the torch model in ONNX Runtime and the reference evaluator."""
import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from lstm_export import LSTM, LayerNormLSTM, UserError
from lstm_export.charlm import CharLM
from lstm_export.config import ModelConfig
from lstm_export.export import build_onnx, export_onnx

I, H, T, B = 4, 6, 5, 3
ATOL = 1e-5


def _model(cls=LSTM, **kw):
    torch.manual_seed(0)
    return cls(I, H, **kw).eval()


def _inputs(m, T=T, B=B, lengths=False, initial_state=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, T, I) if m.batch_first else (T, B, I), generator=g)
    feeds = {"input": x.numpy()}
    state = None
    if initial_state:
        n = m.num_layers * m.num_directions
        state = (torch.randn(n, B, H, generator=g), torch.randn(n, B, H, generator=g))
        feeds.update(h_0=state[0].numpy(), c_0=state[1].numpy())
    lens = None
    if lengths:
        lens = torch.tensor(([T, 2, T - 1, 1] * B)[:B], dtype=torch.int32)
        feeds["lengths"] = lens.numpy()
    with torch.no_grad():
        y, (h, c) = m(x, state, lengths=lens)
    return feeds, {"output": y.numpy(), "h_n": h.numpy(), "c_n": c.numpy()}


def _check(path, feeds, expected, evaluators=("ort", "ref")):
    for ev in evaluators:
        if ev == "ort":
            s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))
        else:
            r = ReferenceEvaluator(str(path))
            got = dict(zip(r.output_names, r.run(None, feeds)))
        assert list(got) == list(expected)
        for k in expected:
            err = np.abs(got[k] - expected[k]).max()
            assert err <= ATOL, f"{ev} {k}: max abs error {err:.3g}"


GRID = [(mode, L, bi, bf, st, ln)
        for mode, L, bi, bf, st, ln in itertools.product(["unrolled", "native", "streaming"], [1, 2], [False, True],
                                                         [False, True], [False, True], [False, True])
        if not (mode == "unrolled" and ln) and not (mode == "streaming" and (bi or not st))]


@pytest.mark.parametrize("mode,num_layers,bidirectional,batch_first,initial_state,lengths", GRID)
def test_export_agrees_with_torch(tmp_path, mode, num_layers, bidirectional, batch_first, initial_state, lengths):
    m = _model(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
    path = export_onnx(m, tmp_path / "m.onnx", mode, seq_len=T if mode == "unrolled" else None,
                       initial_state=initial_state, lengths=lengths)
    feeds, expected = _inputs(m, lengths=lengths, initial_state=initial_state or mode == "streaming")
    # onnx's reference evaluator ignores LSTM sequence_lens (runtimes refuses it there): ORT is the oracle
    _check(path, feeds, expected, evaluators=("ort",) if lengths else ("ort", "ref"))
    if mode != "unrolled":  # one file serves any batch size and sequence length
        feeds, expected = _inputs(m, T=11, B=2, lengths=lengths, initial_state=initial_state or mode == "streaming",
                                  seed=1)
        _check(path, feeds, expected, evaluators=("ort",))


@pytest.mark.parametrize(
    "num_layers,bidirectional,batch_first", itertools.product([1, 2], [False, True], [False, True])
)
def test_layernorm_lstm_unrolled(tmp_path, num_layers, bidirectional, batch_first):
    m = _model(LayerNormLSTM, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.startswith("ln_"):
                p.add_(0.2 * torch.randn_like(p))
    path = export_onnx(m, tmp_path / "ln.onnx", "unrolled", seq_len=T, initial_state=True)
    feeds, expected = _inputs(m, initial_state=True)
    _check(path, feeds, expected)
    with pytest.raises(UserError, match="no native ONNX LSTM op"):
        build_onnx(m, "native")


def test_streaming_in_uneven_chunks_equals_one_call(tmp_path):
    m = _model(num_layers=2)
    path = export_onnx(m, tmp_path / "s.onnx", "streaming")
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((17, 2, I)).astype(np.float32)
    h = c = np.zeros((2, 2, H), np.float32)
    ys = []
    for a, b in [(0, 3), (3, 4), (4, 17)]:  # chunks of 3, 1 and 13 steps
        y, h, c = s.run(None, {"input": x[a:b], "h_0": h, "c_0": c})
        ys.append(y)
    y_all, h_all, c_all = s.run(None, {"input": x, "h_0": np.zeros_like(h), "c_0": np.zeros_like(c)})
    np.testing.assert_allclose(np.concatenate(ys), y_all, atol=1e-6)
    np.testing.assert_allclose(h, h_all, atol=1e-6)
    with torch.no_grad():
        y_t, (h_t, _) = m(torch.from_numpy(x))
    np.testing.assert_allclose(np.concatenate(ys), y_t.numpy(), atol=ATOL)


@pytest.mark.parametrize("mode", ["unrolled", "native", "streaming"])
def test_char_lm_export(tmp_path, mode):
    torch.manual_seed(0)
    lm = CharLM(ModelConfig(vocab_size=11, embed=5, hidden=H, layers=2)).eval()
    path = export_onnx(lm, tmp_path / "lm.onnx", mode, seq_len=7 if mode == "unrolled" else None)
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert "Gather" in ops and "MatMul" in ops and ("LSTM" in ops) == (mode != "unrolled")
    tokens = torch.randint(0, 11, (3, 7))
    feeds = {"tokens": tokens.numpy()}
    state = None
    if mode == "streaming":
        state = (torch.randn(2, 3, H), torch.randn(2, 3, H))
        feeds.update(h_0=state[0].numpy(), c_0=state[1].numpy())
    with torch.no_grad():
        logits, (h, c) = lm(tokens, state)
    _check(path, feeds, {"logits": logits.numpy(), "h_n": h.numpy(), "c_n": c.numpy()})


def test_files_are_checked_named_and_carry_metadata(tmp_path):
    import json
    m = _model(num_layers=2, bidirectional=True)
    for mode in ("unrolled", "native"):
        path = export_onnx(m, tmp_path / f"{mode}.onnx", mode, seq_len=T if mode == "unrolled" else None)
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        assert [i.name for i in inferred.graph.input] == ["input"]
        assert [o.name for o in inferred.graph.output] == ["output", "h_n", "c_n"]
        meta = {p.key: p.value for p in model.metadata_props}
        cfg = json.loads(meta["lstm_export.config"])
        assert cfg == {**cfg, "mode": mode, "hidden_size": H, "num_layers": 2, "bidirectional": True}
        assert model.opset_import[0].version == 17
    unrolled = onnx.load(str(tmp_path / "unrolled.onnx"))
    assert not {"Shape", "ConstantOfShape", "Loop", "Scan"} & {n.op_type for n in unrolled.graph.node}
    native = onnx.load(str(tmp_path / "native.onnx"))
    dims = [d.dim_param for d in native.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == ["time", "batch"]


@pytest.mark.parametrize("mode,opset", [("native", 14), ("native", 20), ("unrolled", 13), ("streaming", 18)])
def test_opsets(tmp_path, mode, opset):
    m = _model()
    path = export_onnx(m, tmp_path / "m.onnx", mode, seq_len=T, opset=opset)
    assert onnx.load(str(path)).opset_import[0].version == opset
    feeds, expected = _inputs(m, initial_state=mode == "streaming")
    _check(path, feeds, expected, evaluators=("ort",))


def test_export_refusals():
    m = _model(bidirectional=True)
    with pytest.raises(UserError, match="opset 13 is not supported for mode 'native'"):
        build_onnx(m, "native", opset=13)
    with pytest.raises(UserError, match="pass seq_len"):
        build_onnx(m, "unrolled")
    with pytest.raises(UserError, match="streaming needs a unidirectional"):
        build_onnx(m, "streaming")
    with pytest.raises(UserError, match="unknown export mode"):
        build_onnx(m, "scan")
    with pytest.raises(UserError, match="variable lengths need the native"):
        build_onnx(m, "unrolled", seq_len=3, lengths=True)


def test_unrolled_graph_imports_into_stock_tvm(tmp_path):
    pytest.importorskip("tvm", reason="apache-tvm is not installed")
    from tvm.relax.frontend.onnx import from_onnx
    for m in (_model(num_layers=2, bidirectional=True, batch_first=True), _model(LayerNormLSTM)):
        path = export_onnx(m, tmp_path / "u.onnx", "unrolled", seq_len=T, batch_size=B, initial_state=True)
        mod = from_onnx(onnx.load(str(path)), keep_params_in_input=False)
        assert "main" in [gv.name_hint for gv in mod.get_global_vars()]


def test_gate_order_helpers_are_inverse_and_match_the_spec():
    from lstm_export.export.layers import onnx_to_torch_gates, torch_to_onnx_gates
    H = 3
    w = np.repeat(np.arange(4.0), H)[:, None] * np.ones((1, 2))  # block k holds k: torch's i, f, g, o
    onnx = torch_to_onnx_gates(w, H)
    assert onnx[::H, 0].tolist() == [0, 3, 1, 2]  # ONNX order i, o, f, c (c = torch's g)
    np.testing.assert_array_equal(onnx_to_torch_gates(onnx, H), w)
