"""compile --precision bf16 (lstm_export/runtimes/tvm_lstm/kernels/lowp/): the kernel against a float64
oracle that rounds the same operands to bf16, the compiled artifact against ONNX Runtime, and the
refusals."""
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed")

from lstm_export.common.errors import UserError  # noqa: E402
from lstm_export.runtimes.tvm_lstm.kernels.lowp import engine, pack  # noqa: E402
from lstm_export.runtimes.tvm_lstm.target.targets import cpu_flags  # noqa: E402
from tests.runtimes.lstm_cases import feeds_for, lstm_model  # noqa: E402

FLAGS = cpu_flags()
needs_bf16 = pytest.mark.skipif("avx512_bf16" not in FLAGS, reason="no AVX512-BF16 on this CPU")
needs_amx = pytest.mark.skipif(not {"amx_bf16", "amx_tile"} <= FLAGS, reason="no AMX-BF16 on this CPU")
needs_cc = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler")


def _round(a):
    return pack.from_bf16(pack.to_bf16(np.asarray(a, np.float32))).astype(np.float64)


def oracle(x, W, R, b, p, h0, c0, lens, reverse, rounded=True):
    """float64 LSTM whose matmul operands (x, W, R and each step's h) are rounded to bf16 first, as
    the kernel rounds them (rounded=False: none are); everything else exact. Returns y, h, c."""
    T, B, _ = x.shape
    H = R.shape[1]
    rnd = _round if rounded else (lambda a: np.asarray(a, np.float64))
    Wr, Rr, xr = rnd(W), rnd(R), rnd(x)
    h, c = h0.astype(np.float64).copy(), c0.astype(np.float64).copy()
    y = np.zeros((T, B, H))
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    for n in range(B):
        for t in range(T if lens is None else int(lens[n])):
            ti = (T if lens is None else int(lens[n])) - 1 - t if reverse else t
            g = Wr @ xr[ti, n] + Rr @ rnd(h[n]) + b
            i, o, f, cc = np.split(g, 4)
            if p is not None:
                i, f = i + p[:H] * c[n], f + p[2 * H:] * c[n]
            c[n] = sig(f) * c[n] + sig(i) * np.tanh(cc)
            if p is not None:
                o = o + p[H:2 * H] * c[n]
            h[n] = sig(o) * np.tanh(c[n])
            y[ti, n] = h[n]
    return y, h, c


@pytest.fixture(scope="module")
def kernel():
    return engine.host_library(shutil.which("gcc") or shutil.which("cc"))


def _run(kernel, x, W, R, b, p, h0, c0, lens, flags):
    T, B, I = x.shape
    H = R.shape[1]
    packed = [pack.pack_weights(W, H), pack.pack_weights(R, H), pack.pack_bias(b, H),
              pack.pack_peepholes(p, H)]
    y, hn, cn = np.full((T, B, H), np.nan, np.float32), np.empty((B, H), np.float32), np.empty((B, H), np.float32)
    ln = np.ascontiguousarray(lens if lens is not None else np.zeros(1), np.int32)
    args = [x, *packed, h0, c0, ln, y, hn, cn]
    assert kernel(*[a.ctypes.data for a in args], T, B, I, H, flags, 2) == 0
    return y, hn, cn


CASES = [  # (T, B, I, H): a row tile's remainder, a narrow last unit block, k not a multiple of 32, B=1, T=1
    (6, 3, 20, 24), (5, 17, 33, 40), (4, 35, 64, 100), (7, 1, 128, 48), (1, 2, 40, 24)]


@needs_bf16
@needs_cc
@pytest.mark.parametrize("kind", ["dot", pytest.param("amx", marks=needs_amx)])
@pytest.mark.parametrize("mode", ["unit", "batch", "project", "auto"])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
def test_kernel_matches_the_bf16_rounded_oracle(kernel, kind, mode, shape):
    """Every engine and split, with initial state, peepholes, lengths (0 and T among them) and the
    reverse direction: within 5e-4 of the oracle that rounds the same operands, while plain fp32
    math is ~1e-2 away (so the test sees a kernel that rounds too much or too little)."""
    T, B, I, H = shape
    rng = np.random.default_rng(T * B)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    W, R = (rng.standard_normal((4 * H, k)).astype(np.float32) * 0.3 for k in (I, H))
    b, p = rng.standard_normal(4 * H).astype(np.float32) * 0.2, rng.standard_normal(3 * H).astype(np.float32) * 0.3
    h0, c0 = rng.standard_normal((B, H)).astype(np.float32), rng.standard_normal((B, H)).astype(np.float32)
    lens = rng.integers(0, T + 1, B).astype(np.int32)
    lens[0] = T
    layer = engine.LowpLayer(kind, mode)
    for reverse, use_lens in ((False, False), (True, True)):
        flags = layer.flags(2 << 20) | engine.HAS_STATE | engine.HAS_PEEP | (engine.REVERSE if reverse else 0) | \
            (engine.HAS_LENS if use_lens else 0)
        got = _run(kernel, x, W, R, b, p, h0, c0, lens if use_lens else None, flags)
        want = oracle(x, W, R, b, p, h0, c0, lens if use_lens else None, reverse)
        for g, w in zip(got, want):
            assert np.isfinite(g).all()
            np.testing.assert_allclose(g, w, atol=5e-4, rtol=0)
        if not use_lens:  # the fp32 answer is measurably further: bf16 really ran
            assert np.abs(got[0] - oracle(x, W, R, b, p, h0, c0, None, False, rounded=False)[0]).max() > 2e-3


@needs_bf16
@needs_cc
def test_no_initial_state_starts_from_zero(kernel):
    T, B, I, H = 5, 4, 16, 20
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    W, R = (rng.standard_normal((4 * H, k)).astype(np.float32) * 0.3 for k in (I, H))
    b, zero = np.zeros(4 * H, np.float32), np.zeros((B, H), np.float32)
    junk = np.full((1, H), np.nan, np.float32)  # the placeholders are never read
    got = _run(kernel, x, W, R, b, None, junk, junk, None, engine.LowpLayer("dot", "unit").flags())
    for g, w in zip(got, oracle(x, W, R, b, None, zero, zero, None, False)):
        np.testing.assert_allclose(g, w, atol=2e-3, rtol=0)


@needs_bf16
@needs_cc
@pytest.mark.parametrize("case", ["bidirectional lengths state peepholes", "forward plain"])
def test_compiled_bf16_artifact_against_onnx_runtime(tmp_path, case):
    """The artifact as deployed (model.so in a folder) against ORT's fp32 answer: within bf16's
    error, every layer recorded as bf16 in meta.json, and not bitwise the fp32 answer."""
    from lstm_export.runtimes.tvm_lstm.pipeline.compile import compile_onnx
    from lstm_export.runtimes.tvm_runtime import TvmLlvmRuntime
    full = case.startswith("bidirectional")
    model = lstm_model(D=2 if full else 1, hidden=40, direction="bidirectional" if full else "forward",
                       optional=("B", "sequence_lens", "initial_h", "initial_c", "P") if full else ("B",))
    onnx.save(model, tmp_path / "m.onnx")
    compiled = compile_onnx(tmp_path / "m.onnx", tmp_path / "out", precision="bf16", plan_budget_s=0.5)
    assert compiled.meta.precision == "bf16"
    assert len(compiled.meta.lowp_layers) == (2 if full else 1)
    rt = TvmLlvmRuntime()
    rt.prepare(tmp_path / "out")
    for T, B in ((6, 3), (4, 20)):
        feeds = feeds_for(model, T, B, seed=T)
        got = rt.run(feeds)
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        errs = [np.abs(got[n] - w).max() for n, w in zip(rt.output_names, want)]
        assert max(errs) < 3e-2, errs
        assert max(errs) > 1e-5, errs  # bf16 ran, not the fp32 kernel
    rt.release()


@needs_cc
def test_bf16_refusals(tmp_path):
    """One line naming the fix: a target without bf16, an LSTM the kernel does not compute, a GRU."""
    from lstm_export.runtimes.tvm_lstm.pipeline.compile import compile_onnx
    plain = lstm_model(hidden=8, optional=("B",))
    onnx.save(plain, tmp_path / "plain.onnx")
    with pytest.raises(UserError, match="AVX512-BF16.*haswell has neither"):
        compile_onnx(tmp_path / "plain.onnx", tmp_path / "a", target="llvm -mcpu=haswell", precision="bf16")
    with pytest.raises(UserError, match="int8 needs a CPU with AVX-512 VNNI; haswell has none"):
        compile_onnx(tmp_path / "plain.onnx", tmp_path / "a", target="llvm -mcpu=haswell", precision="int8")
    with pytest.raises(UserError, match="choose fp32, bf16 or int8"):
        compile_onnx(tmp_path / "plain.onnx", tmp_path / "a", precision="fp16")
    if "avx512_bf16" not in FLAGS:
        return
    onnx.save(lstm_model(hidden=8, optional=("B",), clip=1.0), tmp_path / "clip.onnx")
    with pytest.raises(UserError, match="no clip.*compile it at fp32"):
        compile_onnx(tmp_path / "clip.onnx", tmp_path / "b", precision="bf16")
    from tests.runtimes.rnn_cases import rnn_model
    onnx.save(rnn_model("GRU"), tmp_path / "gru.onnx")
    with pytest.raises(UserError, match="GRU node .*LSTM layers only"):
        compile_onnx(tmp_path / "gru.onnx", tmp_path / "c", precision="bf16")


def test_derived_rule():
    """AMX where there is one, but not for one step of a few rows; the projection first below 16
    rows; the batch split while the bf16 weights fit one core's L2; the kernel's own rule for
    symbolic shapes."""
    assert engine.derived(32, 1, 128, 256, True, 2 << 20) == engine.LowpLayer("amx", "project")
    assert engine.derived(1, 1, 256, 256, True, 2 << 20) == engine.LowpLayer("dot", "unit")
    assert engine.derived(50, 128, 20, 100, True, 2 << 20) == engine.LowpLayer("amx", "batch")
    assert engine.derived(64, 64, 256, 512, False, 2 << 20) == engine.LowpLayer("dot", "unit")  # 3 MB of weights
    assert engine.derived(None, 64, 256, 512, True, 2 << 20).mode == "auto"
    # int8 allowed: int8 weights below 16 rows and for symbolic shapes, AMX bf16 for big batches
    assert engine.derived(32, 1, 128, 256, True, 2 << 20, int8=True) == engine.LowpLayer("vnni", "project")
    assert engine.derived(1, 1, 128, 256, True, 2 << 20, int8=True) == engine.LowpLayer("vnni", "unit")
    assert engine.derived(64, 64, 256, 512, True, 2 << 20, int8=True) == engine.LowpLayer("amx", "unit")
    assert engine.derived(None, None, 256, 512, True, 2 << 20, int8=True) == engine.LowpLayer("vnni", "auto")
    # with AMX-INT8: that for 16 rows and more, and for symbolic shapes (the kernel takes VPDPBUSD below 16)
    assert engine.derived(64, 64, 256, 512, True, 2 << 20, int8=True, amx8=True) == engine.LowpLayer("amx8", "unit")
    assert engine.derived(32, 1, 128, 256, True, 2 << 20, int8=True, amx8=True) == engine.LowpLayer("vnni", "project")
    assert engine.derived(None, 8, 256, 512, True, 2 << 20, int8=True, amx8=True) == engine.LowpLayer("amx8", "auto")
    assert engine.choose(engine.LowpLayer("amx", "unit"), {"amx/unit": 1.0, "amx/batch": 0.97}).mode == "unit"
    assert engine.choose(engine.LowpLayer("amx", "unit"), {"amx/unit": 1.0, "dot/batch": 0.9}).name == "dot/batch"


def test_bf16_rounding_is_round_to_nearest_even():
    v = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5, np.inf], np.float32)
    np.testing.assert_array_equal(pack.from_bf16(pack.to_bf16(v)),
                                  np.array([1.0, 1.0, 1.0 + 2 ** -6, -2.5, np.inf], np.float32))


needs_vnni = pytest.mark.skipif("avx512_vnni" not in FLAGS, reason="no AVX-512 VNNI on this CPU")


def oracle_int8(x, W, R, b, p, h0, c0, lens, reverse):
    """float64 LSTM on what the int8 engine computes with: W and R per-row int8 (dequantized), each x
    row as u8 with scale max|row| / 127, h with one scale max(1, |h0|) / 127 for the call, rounded
    as the kernel rounds (float32 products, nearest even)."""
    T, B, _ = x.shape
    H = R.shape[1]
    Wq, Rq = (pack.dequantize_int8(a).astype(np.float64) for a in (W, R))
    f32 = np.float32
    hscale = f32(max(1.0, float(np.abs(h0).max())) / f32(127))

    def qx(row):
        top = f32(np.abs(row).max())
        inv = f32(127) / top if top > 0 else f32(0)
        return np.rint((row * inv).astype(f32)).astype(np.float64) * np.float64(f32(top / f32(127)))

    def qh(v):
        return np.rint((v.astype(f32) * (f32(1) / hscale)).astype(f32)).astype(np.float64) * np.float64(hscale)
    h, c = h0.astype(np.float64).copy(), c0.astype(np.float64).copy()
    y = np.zeros((T, B, H))
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    for n in range(B):
        L = T if lens is None else int(lens[n])
        for t in range(L):
            ti = L - 1 - t if reverse else t
            g = Wq @ qx(x[ti, n]) + Rq @ qh(h[n]) + b
            i, o, f, cc = np.split(g, 4)
            if p is not None:
                i, f = i + p[:H] * c[n], f + p[2 * H:] * c[n]
            c[n] = sig(f) * c[n] + sig(i) * np.tanh(cc)
            if p is not None:
                o = o + p[H:2 * H] * c[n]
            h[n] = sig(o) * np.tanh(c[n])
            y[ti, n] = h[n]
    return y, h, c


needs_amx8 = pytest.mark.skipif(not {"amx_int8", "amx_tile"} <= FLAGS, reason="no AMX-INT8 on this CPU")


@needs_vnni
@needs_cc
@pytest.mark.parametrize("kind", ["vnni", pytest.param("amx8", marks=needs_amx8)])
@pytest.mark.parametrize("mode", ["unit", "batch", "project", "auto"])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
def test_int8_kernel_matches_its_oracle(kernel, kind, mode, shape):
    """The int8 engines (VPDPBUSD; AMX TDPBUSD, which the kernel replaces by VPDPBUSD for the
    projection first) with state, peepholes, lengths and reverse: within 2e-3 of the oracle that
    quantizes the same way, while the bf16 answer is measurably further."""
    T, B, I, H = shape
    rng = np.random.default_rng(T * B + 7)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    W, R = (rng.standard_normal((4 * H, k)).astype(np.float32) * 0.3 for k in (I, H))
    b, p = rng.standard_normal(4 * H).astype(np.float32) * 0.2, rng.standard_normal(3 * H).astype(np.float32) * 0.3
    h0, c0 = rng.standard_normal((B, H)).astype(np.float32), rng.standard_normal((B, H)).astype(np.float32)
    lens = rng.integers(0, T + 1, B).astype(np.int32)
    lens[0] = T
    layer = engine.LowpLayer(kind, mode)
    for reverse, use_lens in ((False, False), (True, True)):
        flags = layer.flags(2 << 20) | engine.HAS_STATE | engine.HAS_PEEP | (engine.REVERSE if reverse else 0) | \
            (engine.HAS_LENS if use_lens else 0)
        T_, B_ = x.shape[:2]
        packed = [pack.pack_int8(W, H), pack.pack_int8(R, H), pack.pack_bias(b, H),
                  pack.pack_peepholes(p, H)]
        y = np.full((T_, B_, H), np.nan, np.float32)
        hn, cn = np.empty((B_, H), np.float32), np.empty((B_, H), np.float32)
        ln = np.ascontiguousarray(lens if use_lens else np.zeros(1), np.int32)
        args = [x, *packed, h0, c0, ln, y, hn, cn]
        assert kernel(*[a.ctypes.data for a in args], T_, B_, I, H, flags, 2) == 0
        want = oracle_int8(x, W, R, b, p, h0, c0, lens if use_lens else None, reverse)
        for g, w in zip((y, hn, cn), want):
            assert np.isfinite(g).all()
            np.testing.assert_allclose(g, w, atol=2e-3, rtol=0)
        if not use_lens and T > 1:
            assert np.abs(y - oracle(x, W, R, b, p, h0, c0, None, False)[0]).max() > 4e-3


@needs_vnni
@needs_cc
def test_compiled_int8_artifact_against_onnx_runtime(tmp_path):
    """compile --precision int8 of a two-layer LSTM (torch's initialization) at one row: int8
    weights chosen where they pay (recorded in meta.json); the artifact within int8's tolerance of
    ORT's fp32 answer and no further from it than twice ORT's own int8 path."""
    import torch

    from lstm_export import LSTM
    from lstm_export.common.agreement import tolerance_for
    from lstm_export.export import export_onnx
    from lstm_export.runtimes.ort import OrtInt8Runtime
    from lstm_export.runtimes.tvm_lstm.pipeline.compile import compile_onnx
    from lstm_export.runtimes.tvm_runtime import TvmLlvmRuntime
    torch.manual_seed(0)
    path = export_onnx(LSTM(16, 64, 2).eval(), tmp_path / "m.onnx", "native")
    compiled = compile_onnx(path, tmp_path / "out", precision="int8", plan_budget_s=1.0,
                            input_shapes={"input": (24, 1, 16)})
    layers = compiled.meta.lowp_layers
    assert compiled.meta.precision == "int8" and len(layers) == 2 and all(la["timed_ms"] for la in layers)
    feeds = {"input": np.random.default_rng(0).standard_normal((24, 1, 16)).astype(np.float32)}
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    with TvmLlvmRuntime() as rt, OrtInt8Runtime() as peer:
        rt.prepare(tmp_path / "out")
        peer.prepare(path)
        assert rt.precision == "int8"
        got, theirs = rt.run(feeds), peer.run(feeds)
        for n, w in zip(rt.output_names, want):
            ours, ort_int8 = np.abs(got[n] - w).max(), np.abs(theirs[n] - w).max()
            assert ours < tolerance_for("int8", 1e-5, 0)[0] and ours <= 2 * ort_int8 + 1e-4, (n, ours, ort_int8)
            assert ours > 1e-5  # int8 (or bf16) ran, not fp32
