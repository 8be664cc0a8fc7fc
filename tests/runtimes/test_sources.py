"""Model sources and the compile cache: a compiled folder works with every command and is never
compiled again; an .onnx on tvm-* compiles once per model and target. Oracles: ONNX Runtime on the
same ONNX file, and the cache folder's own contents (what was written, when)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from lstm_export import LSTM, export_onnx  # noqa: E402
from lstm_export.runtimes.base import get_runtime  # noqa: E402
from lstm_export.runtimes.model_io import random_feeds  # noqa: E402
from lstm_export.runtimes.source import open_model  # noqa: E402
from lstm_export.runtimes.tvm_lstm.pipeline.cache import cache_key, cached_compile, evict, resolved  # noqa: E402
from lstm_export.runtimes.tvm_lstm.pipeline.compile import compile_onnx  # noqa: E402
from lstm_export.runtimes.tvm_lstm.pipeline.options import CompileOptions  # noqa: E402

pytestmark = pytest.mark.tvm


def _export(path, seed=0, mode="native", hidden=6):
    import torch
    torch.manual_seed(seed)
    return export_onnx(LSTM(3, hidden, 1), path, mode)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One native LSTM compiled once for this CPU; the folder the tests read (never write)."""
    d = tmp_path_factory.mktemp("compiled")
    onnx_path = _export(d / "lstm.onnx")
    return onnx_path, compile_onnx(onnx_path, d / "art", target="llvm", progress=False)


def _ort(path, feeds):
    with get_runtime("ort-cpu") as rt:
        rt.prepare(path)
        return rt.run(feeds)


def test_a_compiled_folder_runs_on_tvm_and_on_every_onnx_runtime(compiled, tmp_path, monkeypatch):
    onnx_path, art = compiled
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = open_model(art.folder)
    assert source.compiled.library == art.library and source.proto is not None
    feeds = random_feeds(source, seed=1, dims={"batch": 3, "time": 5})
    want = _ort(onnx_path, feeds)
    for name in ("tvm-llvm", "ort-cpu", "onnx-reference"):
        with get_runtime(name) as rt:
            rt.prepare(art.folder)
            got = rt.run(feeds)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=f"{name} {k}")
    assert not (tmp_path / "cache" / "lstm-export").exists()  # nothing compiled: the folder's model.so was loaded


def test_a_folder_without_its_onnx_runs_on_tvm_only(compiled, tmp_path):
    import shutil
    _, art = compiled
    bare = tmp_path / "bare"
    shutil.copytree(art.folder, bare)
    (bare / "model.onnx").unlink()
    source = open_model(bare)
    feeds = random_feeds(source, seed=2, dims={"batch": 2, "time": 4})  # specs from meta.json
    with get_runtime("tvm-llvm") as rt:
        rt.prepare(source)
        assert set(rt.run(feeds)) == {"output", "h_n", "c_n"}
    from lstm_export.common.errors import UserError
    with pytest.raises(UserError, match="keeps no model.onnx, so only tvm runtimes can run it"):
        get_runtime("ort-cpu").prepare(source)


def test_cli_commands_take_a_compiled_folder(cli_here, compiled, tmp_path, monkeypatch):
    onnx_path, art = compiled
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    r = cli_here("run", art.folder, "--runtime", "tvm-llvm", "--outputs", tmp_path / "tvm.npz", "--seed", "3")
    assert r.returncode == 0, r.stderr
    r = cli_here("run", onnx_path, "--runtime", "ort-cpu", "--outputs", tmp_path / "ort.npz", "--seed", "3")
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "tvm.npz") as a, np.load(tmp_path / "ort.npz") as b:
        for k in b.files:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5)
    r = cli_here("compare", art.folder, "--runtimes", "ort-cpu,tvm-llvm", "--report", tmp_path / "rep.json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert [x["runtime"] for x in rep["results"]] == ["tvm-llvm"] and rep["passed"]
    assert not (tmp_path / "cache" / "lstm-export").exists()


def test_serve_a_compiled_streaming_folder(tmp_path):
    from fastapi.testclient import TestClient

    from lstm_export.serving.server import ServerConfig, create_app
    onnx_path = _export(tmp_path / "s.onnx", mode="streaming")
    art = compile_onnx(onnx_path, tmp_path / "art", target="llvm", progress=False)
    x = np.random.default_rng(0).standard_normal((4, 1, 3)).astype(np.float32)  # (T, B, I)
    want = _ort(onnx_path, {"input": x, "h_0": np.zeros((1, 1, 6), np.float32),
                            "c_0": np.zeros((1, 1, 6), np.float32)})
    with TestClient(create_app(art.folder, ServerConfig(runtime="tvm-llvm"))) as client:
        assert client.get("/v1/model").json()["runtime"] == "tvm-llvm"
        sid = client.post("/v1/streams").json()["stream_id"]
        got = client.post(f"/v1/streams/{sid}", json={"chunk": x[:, 0].tolist()}).json()["outputs"]
    np.testing.assert_allclose(np.array(got["output"]), want["output"][:, 0], rtol=1e-4, atol=1e-5)


def test_cache_hit_miss_corruption_and_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = tmp_path / "lstm-export" / "tvm"  # cache_root() under XDG_CACHE_HOME
    a, b = open_model(_export(tmp_path / "a.onnx", seed=0)), open_model(_export(tmp_path / "b.onnx", seed=1))
    first, hit = cached_compile(a, target="llvm")
    assert not hit and first.folder.parent == root
    assert first.meta.cache_key == cache_key(a, resolved(CompileOptions(target="llvm")))
    again, hit = cached_compile(a, target="llvm")
    assert hit and again.folder == first.folder
    assert not cached_compile(b, target="llvm")[1]  # other weights: other bytes, other entry
    haswell, hit = cached_compile(a, target="llvm -mcpu=haswell")  # other target: other entry
    assert not hit and haswell.folder != first.folder and haswell.meta.kernel_plan["isa"] == "avx2"
    entries = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert len(entries) == 3
    # a truncated library is noticed and compiled again, and the new one runs
    first.library.write_bytes(first.library.read_bytes()[:1000])
    fixed, hit = cached_compile(a, target="llvm")
    assert not hit and fixed.folder == first.folder
    feeds = random_feeds(a, seed=0, dims={"batch": 2, "time": 3})
    want = _ort(a.path, feeds)["output"]
    with get_runtime("tvm-llvm") as rt:  # the runtime goes through the same cache: a hit
        rt.prepare(a)
        assert rt.cache_hit is True
        np.testing.assert_allclose(rt.run(feeds)["output"], want, rtol=1e-4, atol=1e-5)
    with get_runtime("tvm-llvm", cache=False) as rt:  # --no-cache: a temporary folder, the cache untouched
        rt.prepare(b)
        assert rt.cache_hit is None and not rt.compiled.folder.is_relative_to(root)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == entries


def test_eviction_keeps_the_cache_under_its_cap(tmp_path):
    root = tmp_path / "c"
    for i, n in enumerate(("old", "mid", "new")):
        (root / n).mkdir(parents=True)
        (root / n / "model.so").write_bytes(b"x" * 600_000)
        os.utime(root / n, (1_000_000 + i, 1_000_000 + i))
    removed = evict(root, cap_mb=1.2, keep=root / "old")  # 1.8 MB: one must go; never the one just used
    assert [p.name for p in removed] == ["mid"] and sorted(p.name for p in root.iterdir()) == ["new", "old"]


def test_a_changed_compiler_source_is_a_new_cache_entry(tmp_path, monkeypatch):
    """A development install whose converter or kernel changed must not load an entry built by the
    old code (it once timed a GRU on its old portable loop after the packed kernel landed)."""
    import shutil

    import lstm_export.runtimes.tvm_lstm as pkg
    from lstm_export.runtimes.tvm_lstm.pipeline import cache
    copy = tmp_path / "compiler"
    shutil.copytree(Path(pkg.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__", "tuning_db"))
    before = cache.compiler_digest(copy)
    assert before == cache.compiler_digest.__wrapped__(copy)  # the same source, the same digest
    for changed in ("kernels/cpu_cells.py", "target/thread_pool.c"):  # a stage's module, a C source
        comment = "\n# changed\n" if changed.endswith(".py") else "\n/* changed */\n"
        (copy / changed).write_text((copy / changed).read_text() + comment)
        assert cache.compiler_digest.__wrapped__(copy) != before, changed
        before = cache.compiler_digest.__wrapped__(copy)
    a = open_model(_export(tmp_path / "a.onnx", seed=0))
    key = cache_key(a, resolved(CompileOptions(target="llvm")))
    monkeypatch.setattr(cache, "compiler_digest", lambda: "another compiler")
    assert cache_key(a, resolved(CompileOptions(target="llvm"))) != key


def test_bench_times_a_compiled_folder_as_it_is(cli_here, compiled, tmp_path, monkeypatch):
    _, art = compiled
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    r = cli_here("bench", art.folder, "--runtimes", "ort-cpu,tvm-llvm,onnx-reference", "--min-s", "0.05",
                 "--rounds", "1", "--dim", "batch=2", "--dim", "time=4", "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    rows = {t["entry"]: t for t in json.loads((tmp_path / "b.json").read_text())["timings"]}
    assert set(rows) == {"ort-cpu", "tvm-llvm", "onnx-reference"}
    assert all(t["status"] == "ok" and t["median_ms"] > 0 and t["max_err"] < 1e-4 for t in rows.values())
    # the ratio is against the fastest runtime that is not ours
    best = min(rows["ort-cpu"]["median_ms"], rows["onnx-reference"]["median_ms"])
    assert rows["tvm-llvm"]["ratio_to_best_peer"] == pytest.approx(rows["tvm-llvm"]["median_ms"] / best, rel=1e-2)
    assert not (tmp_path / "cache" / "lstm-export").exists()
