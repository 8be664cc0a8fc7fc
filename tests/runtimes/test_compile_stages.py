"""compile as named stages over one CompileOptions (lstm_export/runtimes/tvm_lstm/pipeline/compile.py):
each stage called alone, the options checked where they are made, meta.json through ArtifactMeta,
and the winning plan built once."""
import json

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed")

from lstm_export import LSTM  # noqa: E402
from lstm_export.common.errors import UserError  # noqa: E402
from lstm_export.export import export_onnx  # noqa: E402
from lstm_export.runtimes.source import ArtifactMeta, CompiledModel, open_model  # noqa: E402
from lstm_export.runtimes.tvm_lstm import CompileOptions, compile_onnx, parse_target  # noqa: E402
from lstm_export.runtimes.tvm_lstm.pipeline import compile as stages  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("stages")
    return export_onnx(LSTM(6, 20, 1).eval(), d / "n.onnx", "native")


def _ort(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _agrees_with_ort(folder, onnx_path, shape):
    """The compiled folder, loaded as users load it, computes what ONNX Runtime does on `onnx_path`."""
    from lstm_export.runtimes.base import get_runtime
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    with get_runtime("tvm-llvm") as rt:
        rt.prepare(folder)
        got = rt.run({"input": x})
    for name, want in _ort(onnx_path, {"input": x}).items():
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fields,message", [
    ({"precision": "fp16"}, "choose fp32, bf16 or int8"),
    ({"plan_budget_s": -1}, r"give 0 \(the derived plan\) or more seconds"),
    ({"tune_trials": -3}, "give a positive number of trials"),
    ({"threads": 0}, "--threads 0"),
])
def test_options_are_checked_where_they_are_made(fields, message):
    with pytest.raises(UserError, match=message):
        CompileOptions(**fields)


def test_the_plan_budget_is_read_from_the_environment_once(monkeypatch):
    monkeypatch.setenv("LSTM_EXPORT_PLAN_BUDGET_S", "2.5")
    opts = CompileOptions()
    monkeypatch.setenv("LSTM_EXPORT_PLAN_BUDGET_S", "7")
    assert opts.plan_budget_s == 2.5 and opts.replace(precision="bf16").plan_budget_s == 2.5
    assert CompileOptions(plan_budget_s=1).plan_budget_s == 1.0
    monkeypatch.setenv("LSTM_EXPORT_PLAN_BUDGET_S", "soon")
    with pytest.raises(UserError, match="not a number of seconds"):
        CompileOptions()


def test_prepare_graph_fixes_the_shapes_it_is_told_and_computes_the_same(small, tmp_path):
    """The prepared graph takes the static shapes given, binds their symbolic dims, and ONNX Runtime
    computes on it what it computes on the original."""
    source = open_model(small)
    graph = stages.prepare_graph(source, CompileOptions(input_shapes={"input": (4, 3, 6)}))
    assert graph.static == {"input": (4, 3, 6)} and set(graph.dims.values()) == {4, 3}
    (tmp_path / "p.onnx").write_bytes(graph.model.SerializeToString())
    x = np.random.default_rng(0).standard_normal((4, 3, 6)).astype(np.float32)
    want, got = _ort(small, {"input": x}), _ort(tmp_path / "p.onnx", {"input": x})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)


def test_kernel_setup_says_why_a_plan_is_derived():
    host, haswell = parse_target("llvm"), parse_target("llvm -mcpu=haswell")
    assert stages.kernel_setup(host, CompileOptions(plan_budget_s=3)).choice.source == "measured"
    zero = stages.kernel_setup(host, CompileOptions(plan_budget_s=0))
    assert zero.choice.source == "derived" and zero.choice.why == "--plan-budget-s 0" and zero.plan.lanes
    other = stages.kernel_setup(haswell, CompileOptions(plan_budget_s=3))
    assert other.choice.source == "derived" and "not this machine" in other.choice.why and other.plan.isa == "avx2"
    cuda = stages.kernel_setup(parse_target("cuda", None, "sm_90"), CompileOptions(target="cuda"))
    assert cuda.plan is None and cuda.convert.cuda and cuda.lanes == 16


def test_the_stages_called_one_by_one_make_the_artifact(small, tmp_path):
    """prepare -> setup -> import -> tuning -> build -> write, each alone: the folder opens as a
    compiled model whose meta.json reads back equal, and it computes what ONNX Runtime does."""
    opts = CompileOptions(plan_budget_s=0, tuning_db="none", progress=False)
    graph = stages.prepare_graph(open_model(small), opts)
    setup = stages.kernel_setup(parse_target(opts.target), opts)
    mod = stages.import_graph(graph, setup)
    tuning = stages.open_tuning(mod, setup.target, opts)
    assert tuning.database is None  # --tuning-db none
    built = stages.build(graph.model, mod, setup.target, tuning.database, setup.lanes)
    compiled = stages.write_artifact(tmp_path / "art", graph, setup, built, tuning, 1.25)
    opened = CompiledModel.open(tmp_path / "art")
    assert opened.meta == compiled.meta and opened.meta.compile_s == 1.25 and opened.meta.lowp_layers is None
    _agrees_with_ort(tmp_path / "art", small, (5, 2, 6))


def test_meta_json_reads_folders_of_earlier_releases(tmp_path):
    """A folder compiled before reduced precision was named lowp says bf16_layers; a key a newer
    release adds is ignored; what is None is not written."""
    meta = ArtifactMeta(inputs=[{"name": "x", "dtype": "float32", "shape": [1]}], outputs=[], target="llvm",
                        target_kind="llvm", tvm_version="0.27")
    meta.write(tmp_path)
    written = json.loads((tmp_path / "meta.json").read_text())
    assert "lowp_layers" not in written and ArtifactMeta.read(tmp_path) == meta
    old = dict(written, bf16_layers=[{"engine": "dot"}], some_future_key=3)
    assert ArtifactMeta.from_dict(old).lowp_layers == [{"engine": "dot"}]


def test_the_winning_plan_is_built_once(monkeypatch, small, tmp_path):
    """Measured selection builds each distinct candidate once and hands back the winner as built:
    no build after it (the old path imported and built the winner again), and the artifact agrees
    with ONNX Runtime."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # no plan cache from other tests
    builds = []
    real = stages.build

    def counting(model, mod, *args, **kwargs):
        builds.append(mod)
        return real(model, mod, *args, **kwargs)
    monkeypatch.setattr(stages, "build", counting)
    compiled = compile_onnx(small, tmp_path / "o", plan_budget_s=60, input_shapes={"input": (5, 8, 6)},
                            progress=False)
    choice = compiled.meta.plan_selection
    timed = [c for c in choice["candidates"] if "ms" in c]
    assert choice["source"] == "measured" and len(timed) >= 2
    assert len(builds) == len(timed)  # one build per timed candidate, none for the winner again
    _agrees_with_ort(tmp_path / "o", small, (5, 8, 6))
