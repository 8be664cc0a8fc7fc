"""TVM: our Relax converter for ONNX LSTM over the whole spec, against ONNX Runtime; compile and run."""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm", reason="apache-tvm is not installed")
pytestmark = pytest.mark.tvm

from lstm_export import LSTM, LayerNormLSTM, UserError  # noqa: E402
from lstm_export.export import export_onnx  # noqa: E402
from lstm_export.runtimes.tvm_runtime import TvmLlvmRuntime  # noqa: E402

from ..marks import one_fast  # noqa: E402
from .lstm_cases import ALL_OPTIONAL, H, I, check, feeds_for, lstm_model, ort_oracle  # noqa: E402


@pytest.mark.parametrize("direction,layout,optional", one_fast(
    itertools.product(["bidirectional", "forward", "reverse"], [1, 0], [ALL_OPTIONAL, ()]), multi=True))
def test_directions_layouts_and_optional_inputs(tmp_path, direction, layout, optional):
    D = 2 if direction == "bidirectional" else 1
    check(lstm_model(D, layout, optional, direction=direction), tmp_path)


@pytest.mark.parametrize(
    "optional",
    one_fast([("sequence_lens",), ("B",), ("initial_h",), ("initial_c", "P"), ("B", "initial_h", "initial_c")]),
)
def test_each_optional_input_alone(tmp_path, optional):
    check(lstm_model(2, 0, optional, direction="bidirectional"), tmp_path)


ACTIVATIONS = [
    {"activations": ["HardSigmoid", "Elu", "Softsign"], "activation_alpha": [0.3, 0.9], "activation_beta": [0.4]},
    {"activations": ["Sigmoid", "Affine", "ScaledTanh"], "activation_alpha": [0.7, 1.1], "activation_beta": [0.2, 0.8]},
    {"activations": ["LeakyRelu", "ThresholdedRelu", "Softplus"], "activation_alpha": [0.1, 0.2]},
    {"activations": ["Sigmoid", "Relu", "Tanh", "Sigmoid", "Tanh", "Softsign"]},  # per direction
]


@pytest.mark.parametrize("attrs", one_fast(ACTIVATIONS), ids=["hardsigmoid-elu-softsign", "affine-scaledtanh",
                                                    "leaky-thresholded-softplus", "per-direction"])
def test_activations(tmp_path, attrs):
    D = 2 if len(attrs["activations"]) == 6 else 1
    check(lstm_model(D, 0, ALL_OPTIONAL, direction="bidirectional" if D == 2 else "forward", **attrs), tmp_path)


@pytest.mark.parametrize("attrs", one_fast([{"clip": 0.8, "input_forget": 1}, {"clip": 0.4}, {"input_forget": 1}]))
def test_clip_and_input_forget(tmp_path, attrs):
    check(lstm_model(2, 0, ALL_OPTIONAL, direction="bidirectional", **attrs), tmp_path)


@pytest.mark.parametrize("outputs", one_fast([("Y_h", "Y_c"), ("Y",), ("Y_h",), ("Y_c",), ("Y", "Y_c")]))
def test_any_subset_of_outputs(tmp_path, outputs):
    check(lstm_model(1, 0, ("B", "initial_h", "initial_c"), outputs=outputs), tmp_path)


@pytest.mark.parametrize("direction", one_fast(["bidirectional", "forward"]))
def test_computed_weights_take_the_portable_path(tmp_path, direction):
    D = 2 if direction == "bidirectional" else 1
    check(lstm_model(D, 0, ALL_OPTIONAL, computed_weights=True, direction=direction, clip=0.9), tmp_path)


@pytest.mark.slow
def test_opset_7(tmp_path):
    check(lstm_model(2, 0, ALL_OPTIONAL, opset=7, direction="bidirectional"), tmp_path)


@pytest.mark.slow
def test_model_exported_by_torch_with_other_ops(tmp_path):
    """Conv -> Relu -> Transpose -> LSTM (2 layers, bidirectional) -> MatMul -> Sigmoid, from torch's exporter."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(3, 8, 3, padding=1)
            self.lstm = torch.nn.LSTM(8, 16, 2, batch_first=True, bidirectional=True)
            self.head = torch.nn.Linear(32, 4)

        def forward(self, x):  # (B, C, T)
            y, _ = self.lstm(torch.relu(self.conv(x)).transpose(1, 2))
            return torch.sigmoid(self.head(y)).squeeze(-1)

    torch.manual_seed(0)
    path = tmp_path / "net.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(2, 3, 10),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch", 2: "time"}}, opset_version=17)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Conv", "Relu", "Transpose", "LSTM", "Sigmoid"} <= ops
    rt = TvmLlvmRuntime()
    rt.prepare(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 3, 10), (1, 3, 23)]:
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(rt.run({"x": x})["y"], sess.run(None, {"x": x})[0], atol=1e-5)


def test_ir_does_not_grow_with_sequence_length():
    """The time loop stays a loop: a fixed T of 16 or 1024 gives the same IR."""
    from lstm_export.runtimes.tvm_lstm.pipeline.compile import import_onnx
    sizes = []
    for T in (16, 1024):
        m = LSTM(I, H, 2).eval()
        mod = import_onnx(export_onnx_proto(m, T))
        sizes.append(len(mod.script()))
    assert abs(sizes[0] - sizes[1]) < 100, sizes


def export_onnx_proto(m, T):
    from lstm_export.export import build_onnx
    return build_onnx(m, "native", seq_len=T)


def test_compile_cli_writes_the_contract_and_loads_with_the_runtime_alone(cli, tmp_path):
    m = LSTM(I, H, 2, batch_first=True).eval()
    path = export_onnx(m, tmp_path / "n.onnx", "native", initial_state=True, lengths=True)
    r = cli("compile", path, "--target", "llvm", "--out", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "art" / "meta.json").read_text())
    assert [i["name"] for i in meta["inputs"]] == ["input", "h_0", "c_0", "lengths"]
    assert [o["name"] for o in meta["outputs"]] == ["output", "h_n", "c_n"]
    assert meta["target_kind"] == "llvm" and meta["tvm_version"]
    feeds = {"input": np.random.default_rng(0).standard_normal((3, 6, I)).astype(np.float32),
             "h_0": np.zeros((2, 3, H), np.float32), "c_0": np.zeros((2, 3, H), np.float32),
             "lengths": np.array([6, 2, 4], np.int32)}
    np.savez(tmp_path / "in.npz", **feeds)
    script = (
        "import sys, numpy as np, tvm\n"
        "from tvm.runtime.vm import VirtualMachine\n"
        "assert tvm.base._RUNTIME_ONLY, 'the compiler library was loaded'\n"
        "vm = VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cpu())\n"
        "z = np.load(sys.argv[2])\n"
        "out = vm['main'](*[tvm.runtime.tensor(z[k]) for k in ('input', 'h_0', 'c_0', 'lengths')])\n"
        "np.savez(sys.argv[3], output=out[0].numpy(), h_n=out[1].numpy())\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "art" / "model.so"), str(tmp_path / "in.npz"),
                        str(tmp_path / "out.npz")], env=dict(os.environ, TVM_USE_RUNTIME_LIB="1"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["output"], expected[0], atol=1e-5)
        np.testing.assert_allclose(out["h_n"], expected[1], atol=1e-5)


@pytest.mark.parametrize("mode", one_fast(["native", "unrolled"]))
def test_tvm_llvm_runs_our_exports_in_compare(cli, tmp_path, mode):
    m = LSTM(I, H, 2, bidirectional=True).eval()
    path = export_onnx(m, tmp_path / f"{mode}.onnx", mode, seq_len=7 if mode == "unrolled" else None)
    r = cli("compare", path, "--runtimes", "ort-cpu,tvm-llvm", "--dim", "time=7", "--dim", "batch=2")
    assert r.returncode == 0 and "tvm-llvm" in r.stdout, r.stdout + r.stderr


def test_layernorm_lstm_goes_the_unrolled_way(tmp_path):
    m = LayerNormLSTM(I, H).eval()
    path = export_onnx(m, tmp_path / "ln.onnx", "unrolled", seq_len=6, initial_state=True)
    rt = TvmLlvmRuntime()
    rt.prepare(path)
    feeds = {"input": np.random.default_rng(0).standard_normal((6, 2, I)).astype(np.float32),
             "h_0": np.zeros((1, 2, H), np.float32), "c_0": np.zeros((1, 2, H), np.float32)}
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for g, e in zip(rt.run(feeds).values(), expected):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_cuda_target_compiles_here(tmp_path):
    import shutil
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH")
    from lstm_export.runtimes.tvm_lstm.pipeline.compile import compile_onnx
    m = LSTM(I, H, 2, bidirectional=True).eval()
    path = export_onnx(m, tmp_path / "n.onnx", "native", initial_state=True, lengths=True)
    lib = compile_onnx(path, tmp_path / "cuda", target="cuda", arch="sm_90").library
    assert lib.stat().st_size > 0
    assert json.loads((tmp_path / "cuda" / "meta.json").read_text())["target_kind"] == "cuda"


def test_tvm_cuda_run_skips_without_a_device():
    from lstm_export.runtimes.tvm_runtime import TvmCudaRuntime
    a = TvmCudaRuntime.availability()
    if a:
        pytest.skip("a CUDA device is present; tests/runtimes/test_contract.py runs tvm-cuda")
    assert a.reason == "no CUDA device"


# --- bad input -----------------------------------------------------------------------------------

def _compile_error(model, tmp_path):
    from lstm_export.runtimes.tvm_lstm.pipeline.compile import compile_onnx
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(UserError) as e:
        compile_onnx(tmp_path / "bad.onnx", tmp_path / "out")
    return str(e.value)


def test_inconsistent_shapes_are_named(tmp_path):
    m = lstm_model(1, 0, ())
    m.graph.node[0].attribute[0].i = H + 1  # hidden_size disagrees with R
    msg = _compile_error(m, tmp_path)
    assert "the_lstm" in msg and "W has shape [1, 16, 3], expected" in msg
    m = lstm_model(2, 0, (), direction="forward")  # W says two directions, the node one
    msg = _compile_error(m, tmp_path)
    assert "the_lstm" in msg and "num_directions=1" in msg


def test_unknown_attribute_and_missing_op_are_named(tmp_path):
    from lstm_export.runtimes.tvm_lstm.pipeline.compile import import_onnx
    m = lstm_model(1, 0, ())
    m.graph.node[0].attribute.append(helper.make_attribute("zoneout", 0.1))
    assert "Unrecognized attribute: zoneout for operator LSTM" in _compile_error(m, tmp_path)  # onnx's checker
    with pytest.raises(UserError, match=r"the_lstm.*unsupported attribute\(s\) \['zoneout'\]"):
        import_onnx(m)  # our converter, for models handed to TVM without the checker
    g = helper.make_graph([helper.make_node("Det", ["X"], ["Y"])], "g",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 2, 2])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3])])
    det = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    det.ir_version = 8
    assert "no converter for operator(s) Det" in _compile_error(det, tmp_path)


def test_cuda_compile_without_nvcc_says_so(cli, tmp_path):
    m = LSTM(I, H).eval()
    path = export_onnx(m, tmp_path / "n.onnx", "native")
    r = cli("compile", path, "--target", "cuda", "--out", tmp_path / "c", env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "needs nvcc" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow  # the fast subset checks the kernels against float64 in test_isa_variant_against_float64
@pytest.mark.parametrize("bidirectional,lengths", [(False, False), (True, True)])
def test_tvm_against_the_float64_reference(tmp_path, bidirectional, lengths):
    """Our exported native graph on tvm-llvm against lstm_export.reference (float64 numpy)."""
    from lstm_export.runtimes.numpy_reference import NumpyReferenceRuntime
    m = LSTM(I, 20, 2, bidirectional=bidirectional).eval()  # 20: padded to 32 units inside the kernel
    path = export_onnx(m, tmp_path / "n.onnx", "native", initial_state=True, lengths=lengths)
    D = 2 if bidirectional else 1
    rng = np.random.default_rng(0)
    feeds = {"input": rng.standard_normal((40, 5, I)).astype(np.float32),
             "h_0": rng.standard_normal((2 * D, 5, 20)).astype(np.float32),
             "c_0": rng.standard_normal((2 * D, 5, 20)).astype(np.float32)}
    if lengths:
        feeds["lengths"] = np.array([40, 3, 17, 1, 40], np.int32)
    ref = NumpyReferenceRuntime(model=m)
    ref.prepare()
    expected = ref.run(feeds)
    rt = TvmLlvmRuntime()
    rt.prepare(path)
    for k, v in rt.run(feeds).items():
        np.testing.assert_allclose(v, expected[k], atol=2e-5, err_msg=k)


def test_generic_cpu_kernels_get_a_schedule():
    """The char LM's head (MatMul + Add) is scheduled on the CPU instead of left as a plain loop nest."""
    import tvm
    from tvm.relax.backend.cpu_generic import legalize_passes

    from lstm_export.charlm import CharLM
    from lstm_export.config import ModelConfig
    from lstm_export.export import build_onnx
    from lstm_export.runtimes.tvm_lstm.kernels.generic_schedule import schedule_generic_cpu_kernels
    from lstm_export.runtimes.tvm_lstm.pipeline.compile import host_target, import_onnx
    for vocab in (160, 163):  # a multiple of 16 (vectorized) and not (reordered + parallel)
        mod = import_onnx(build_onnx(CharLM(ModelConfig(vocab_size=vocab, embed=8, hidden=16, layers=1)).eval(),
                                     "native"))
        target = host_target()
        with target:
            mod = tvm.transform.Sequential(legalize_passes(target))(mod)
        mod = schedule_generic_cpu_kernels(mod)
        heads = [f for gv, f in mod.functions.items() if "matmul" in gv.name_hint]
        assert heads and all("tirx.is_scheduled" in f.attrs for f in heads)


def _placed(v: np.ndarray, aligned: bool) -> np.ndarray:
    """A copy of v whose data starts on (or just off) a 64-byte boundary."""
    buf = np.empty(v.size + 64, v.dtype)
    off = (-buf.ctypes.data % 64) // v.itemsize + (0 if aligned else 1)
    out = buf[off:off + v.size].reshape(v.shape)
    out[...] = v
    assert (out.ctypes.data % 64 == 0) == aligned
    return out


def test_inputs_shared_or_staged_never_mix(tmp_path):
    """Aligned inputs are handed to the VM without a copy, unaligned ones go through a staging tensor
    per input: two same-shaped inputs (initial_h, initial_c) must not share it, a second call must not
    see the first call's data, and the caller's arrays must come back untouched."""
    model = lstm_model(1, 0, ALL_OPTIONAL)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rt = TvmLlvmRuntime()
    rt.prepare(path)
    for seed in (0, 1):
        feeds = feeds_for(model, 4, 2, seed)
        expected = ort_oracle(model, feeds)
        for aligned in (False, True):
            placed = {k: _placed(v, aligned) for k, v in feeds.items()}
            got = rt.run(placed)
            for (name, g), e in zip(got.items(), expected):
                np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5, err_msg=f"{name}, aligned={aligned}")
            for k, v in placed.items():
                np.testing.assert_array_equal(v, feeds[k])
    rt.release()


def test_outputs_the_call_allocates_are_shared_and_stay_valid(tmp_path):
    """tvm-llvm hands out the outputs a call allocated without copying them: results kept from one
    call must survive the next calls and the runtime's release, and two calls never share memory."""
    model = lstm_model(1, 0, ALL_OPTIONAL)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rt = TvmLlvmRuntime()
    rt.prepare(path)
    assert rt._owned == [True, True, True]
    kept = [(rt.run(f), ort_oracle(model, f)) for f in (feeds_for(model, 4, 2, seed) for seed in (0, 1, 2))]
    rt.release()
    for got, expected in kept:
        for g, e in zip(got.values(), expected):
            np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)
    arrays = [a for got, _ in kept for a in got.values()]
    assert not any(np.shares_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:])


def test_outputs_that_are_inputs_or_constants_are_copied(tmp_path):
    """An output the VM did not allocate (a graph input passed through, a constant), or one that two
    outputs share, is copied: the caller can neither alias its own feed through it nor change the
    model's constant, and writing one output never changes another."""
    const = np.arange(6, dtype=np.float32).reshape(2, 3)
    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["same"]), helper.make_node("Add", ["x", "x"], ["twice"]),
         helper.make_node("Mul", ["x", "x"], ["square"]), helper.make_node("Identity", ["square"], ["square2"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("same", "k", "twice", "square",
                                                                               "square2")],
        [numpy_helper.from_array(const, "k")])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    rt = TvmLlvmRuntime()
    rt.prepare(path)
    assert rt._owned == [False, False, True, False, False]  # square and square2 are one tensor
    x = _placed(np.full((2, 3), 3, np.float32), aligned=True)  # shared with the VM, not staged
    out = rt.run({"x": x})
    np.testing.assert_array_equal(out["twice"], 2 * x)
    assert not np.shares_memory(out["same"], x)
    assert not np.shares_memory(out["square"], out["square2"])
    out["k"][...] = -1
    out["same"][...] = -1
    out["square"][...] = -1
    np.testing.assert_array_equal(x, 3)
    np.testing.assert_array_equal(out["square2"], 9)
    np.testing.assert_array_equal(rt.run({"x": x})["k"], const)
    rt.release()
