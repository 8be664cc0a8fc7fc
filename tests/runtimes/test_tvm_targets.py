"""Targets: full TVM targets on the command line, cross-compiling, and the artifact's own thread pool."""
import dataclasses
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed")
pytestmark = pytest.mark.tvm

from lstm_export import LSTM, UserError  # noqa: E402
from lstm_export.export import export_onnx  # noqa: E402
from lstm_export.runtimes.tvm_lstm.pipeline.compile import compile_onnx  # noqa: E402
from lstm_export.runtimes.tvm_lstm.target.targets import parse_target, usable_cores  # noqa: E402

from .test_tvm_cpu_kernel import host_flags  # noqa: E402


@pytest.fixture(scope="module")
def small_native(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    m = LSTM(6, 20, 1).eval()
    return export_onnx(m, d / "n.onnx", "native")


def test_target_strings_and_json_name_the_same_target():
    a = parse_target("llvm -mcpu=haswell -mattr=+avx2,+fma -num-cores=3 -mtriple=x86_64-linux-gnu")
    b = parse_target('{"kind": "llvm", "mcpu": "haswell", "mattr": ["+avx2", "+fma"], "num-cores": 3, '
                     '"mtriple": "x86_64-linux-gnu"}')
    assert str(a.export()) == str(b.export())
    assert (
        a.attrs["mcpu"] == "haswell" and int(a.attrs["num-cores"]) == 3 and list(a.attrs["mattr"]) == ["+avx2", "+fma"]
    )
    host = parse_target("llvm")
    assert int(host.attrs["num-cores"]) == usable_cores() and host.attrs["mcpu"]
    assert int(parse_target("llvm -mcpu=haswell", threads=5).attrs["num-cores"]) == 5
    assert int(parse_target('{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}').attrs["num-cores"]) == 1


@pytest.mark.parametrize("text,needle", [
    ("", "--target is empty"),
    ("{not json", "not valid JSON"),
    ('["llvm"]', "must be an object"),
    ("metal", "kind 'metal' is not supported"),
    ("llvm -mcpu=pentium9000", "mcpu 'pentium9000' is not a CPU LLVM knows"),
    ("llvm mcpu=haswell", "is not of the form -key=value"),
    ("llvm -num-cores=0", "num-cores must be at least 1"),
    ('{"kind": "llvm", "bogus-key": 1}', "is not a TVM target"),
])
def test_bad_targets_are_one_line_errors(text, needle):
    with pytest.raises(UserError, match=None) as e:
        parse_target(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_target_on_the_command_line_exits_2(cli, small_native, tmp_path):
    r = cli("compile", small_native, "--target", "llvm -mcpu=pentium9000", "--out", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_avx2_build_runs_here(cli, small_native, tmp_path):
    """`--target 'llvm -mcpu=haswell'` makes the AVX2 kernel (8 lanes, 3-row tiles), which any x86-64
    machine with AVX2 runs: compiled through the CLI, loaded from the folder, checked against ORT."""
    if not {"avx2", "fma"} <= host_flags():
        pytest.skip("no AVX2/FMA on this CPU")
    from lstm_export.runtimes.tvm_runtime import TvmLlvmRuntime
    r = cli("compile", small_native, "--target", "llvm -mcpu=haswell", "--out", tmp_path / "avx2")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "avx2" / "meta.json").read_text())
    assert meta["kernel_plan"]["isa"] == "avx2" and meta["kernel_plan"]["lanes"] == 8 and meta["cross_compiled"]
    assert "avx2" in r.stdout
    rt = TvmLlvmRuntime()
    rt.prepare(tmp_path / "avx2")
    x = np.random.default_rng(0).standard_normal((7, 9, 6)).astype(np.float32)
    expected = ort.InferenceSession(str(small_native), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    for g, e in zip(rt.run({"input": x}).values(), expected):
        np.testing.assert_allclose(g, e, atol=1e-5)


@pytest.mark.parametrize("linker", ["absent", "installed"])
def test_aarch64_cross_compile_packs_an_aarch64_object(small_native, tmp_path, monkeypatch, linker):
    """What this proves: for `mtriple=aarch64-linux-gnu` the whole model (our NEON-planned LSTM kernel
    included) compiles here to aarch64 ELF code: without an aarch64 linker, objects packed in
    model.tar with the thread-pool constructor's source for the target's 4 cores; with Debian's
    gcc-aarch64-linux-gnu, a linked aarch64 model.so. It does not run it: there is no aarch64
    machine here. The kernel's NEON FMAs are checked in
    test_tvm_cpu_kernel.py::test_kernel_uses_the_targets_vector_registers."""
    import shutil

    from lstm_export.runtimes.tvm_lstm.target import thread_pool
    if linker == "absent":
        monkeypatch.setattr(thread_pool, "compiler_for", lambda triple, host: None)
    elif shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("no aarch64 cross linker (apt-get install gcc-aarch64-linux-gnu)")
    lib = compile_onnx(small_native, tmp_path / "arm", target='{"kind": "llvm", "mtriple": "aarch64-linux-gnu", '
                       '"mcpu": "neoverse-n1", "num-cores": 4}', progress=False).library
    meta = json.loads((tmp_path / "arm" / "meta.json").read_text())
    assert meta["kernel_plan"]["isa"] == "neon" and meta["kernel_plan"]["lanes"] == 4 and meta["num_cores"] == 4
    assert lib.suffix == (".tar" if linker == "absent" else ".so")
    if lib.suffix == ".so":
        objects = [lib.read_bytes()]
    else:
        with tarfile.open(lib) as tar:
            names = tar.getnames()
            assert "lstm_export_threads.c" in names
            assert "int n = 4;" in tar.extractfile("lstm_export_threads.c").read().decode()
            objects = [tar.extractfile(n).read() for n in names if n.endswith(".o")]
    assert objects
    em_aarch64 = 183
    for obj in objects:
        assert obj[:4] == b"\x7fELF" and obj[4] == 2  # 64-bit ELF
        assert int.from_bytes(obj[18:20], "little") == em_aarch64
    assert any(b"lstm_layer_cpu" in obj for obj in objects)
    from lstm_export.runtimes.tvm_runtime import TvmLlvmRuntime
    with pytest.raises(UserError, match="cross-compiled for aarch64"):
        TvmLlvmRuntime().prepare(tmp_path / "arm")


LOAD = (
    "import numpy as np, tvm\n"
    "from tvm.runtime.vm import VirtualMachine\n"
    "vm = VirtualMachine(tvm.runtime.load_module({lib!r}), tvm.cpu())\n"
    "vm['main'](tvm.runtime.tensor(np.zeros((2, 8, 6), np.float32)))\n"
    "print(tvm.get_global_func('runtime.NumThreads')())\n")


def _threads_in_fresh_process(lib, **env_changes) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env.update(env_changes, TVM_USE_RUNTIME_LIB="1")
    r = subprocess.run([sys.executable, "-c", LOAD.format(lib=str(lib))], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.strip().splitlines()[-1])


def test_plain_load_runs_on_the_cores_it_was_compiled_for(small_native, tmp_path):
    """A model.so loaded the README's way (TVM's runtime alone, no environment variables) in a
    fresh process runs its thread pool on the target's num-cores (at most the usable CPUs), not
    TVM's default of half the logical CPUs; a TVM_NUM_THREADS the user set wins. (Made for 3 cores:
    on a 2-CPU machine that also shows the cap.)"""
    lib = compile_onnx(small_native, tmp_path / "c3", target="llvm", threads=3, progress=False).library
    assert _threads_in_fresh_process(lib) == min(3, usable_cores())
    assert _threads_in_fresh_process(lib, TVM_NUM_THREADS="1") == 1


def test_an_artifact_for_an_isa_this_cpu_lacks_is_refused(monkeypatch):
    """An AVX-512 model.so on an AVX2-only CPU would die of an illegal instruction: the runtime
    refuses it in one line first (the CPU's flags faked as an AMD EPYC's)."""
    import platform

    from lstm_export.runtimes import tvm_runtime
    monkeypatch.setattr(tvm_runtime, "_cpu_flags", lambda: {"sse2", "avx", "avx2", "fma"})
    here = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    from lstm_export.runtimes.source import ArtifactMeta
    meta = ArtifactMeta([], [], "llvm", "llvm", "0.27", arch=here, kernel_plan={"isa": "avx512"})
    with pytest.raises(UserError, match="built for avx512 and this CPU lacks avx512f"):
        tvm_runtime._check_runs_here(meta, "DIR")
    tvm_runtime._check_runs_here(dataclasses.replace(meta, kernel_plan={"isa": "avx2"}), "DIR")  # runs: no error


def test_our_runtime_on_an_onnx_file_runs_on_every_core(small_native):
    """`lstm-export run/compare` compile an .onnx in-process and load the artifact: the pool the
    kernels then run on has the compile target's cores, with no TVM_NUM_THREADS set."""
    script = ("import sys, numpy as np, tvm\n"
              "from lstm_export.runtimes.tvm_runtime import TvmLlvmRuntime\n"
              "rt = TvmLlvmRuntime()\n"
              "rt.prepare(sys.argv[1])\n"
              "rt.run({'input': np.zeros((2, 8, 6), np.float32)})\n"
              "print(tvm.get_global_func('runtime.NumThreads')())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", script, str(small_native)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip().splitlines()[-1]) == usable_cores()


def test_pool_threads_nests_in_one_thread():
    """The bench sizes TVM's pool for its whole run and a compile inside it (plan selection, the bf16
    engines) sizes it again: the inner block must not wait on the outer one (it deadlocked bench)."""
    import os
    import threading

    from lstm_export.runtimes.tvm_lstm.target.thread_pool import pool_threads
    done = threading.Event()

    def nested():
        with pool_threads(2), pool_threads(3):
            done.set()
    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(10)
    assert done.is_set(), "pool_threads deadlocked when nested"
    assert "TVM_NUM_THREADS" not in os.environ or os.environ.get("TVM_NUM_THREADS")  # restored, not emptied
