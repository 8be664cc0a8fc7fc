"""thread_pool.c: an artifact whose kernels share the cores with the rest of the process. Each check
runs in a fresh process that loads model.so the README's way, so TVM's pool starts as a user's does
(its size and spin count are read once, when it starts)."""
import ctypes
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed")
pytestmark = pytest.mark.tvm

from lstm_export import LSTM  # noqa: E402
from lstm_export.export import export_onnx  # noqa: E402
from lstm_export.runtimes.tvm_lstm.pipeline.compile import compile_onnx  # noqa: E402
from lstm_export.runtimes.tvm_lstm.target.targets import cpu_flags, usable_cores  # noqa: E402

needs_two = pytest.mark.skipif(usable_cores() < 2, reason="one usable CPU: the kernels run on one thread")
needs_bf16 = pytest.mark.skipif("avx512_bf16" not in cpu_flags(), reason="no AVX512-BF16 on this CPU")

# T32 B1 H256: a launch (before: a barrier) per step, the shape a taken core hurt most (0.24 ms -> 40 ms)
SHAPE = (32, 1, 128, 256)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    import torch
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("shared")
    T, B, I, H = SHAPE
    onnx_path = export_onnx(LSTM(I, H, 1).eval(), d / "n.onnx", "native")
    return compile_onnx(onnx_path, d / "out", target="llvm", threads=2, progress=False).library


def _fresh(script: str, lib, **env_changes) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")}
    env.update(env_changes, TVM_USE_RUNTIME_LIB="1")
    prelude = ("import ctypes, json, sys, time, numpy as np, tvm\n"
               "from tvm.runtime.vm import VirtualMachine\n"
               "lib = sys.argv[1]\n"
               "vm = VirtualMachine(tvm.runtime.load_module(lib), tvm.cpu())\n"
               f"x = np.random.default_rng(0).standard_normal({SHAPE[:3]!r}).astype(np.float32)\n"
               "def call():\n"
               "    out = vm['main'](tvm.runtime.tensor(x))\n"
               "    return (out if hasattr(out, 'numpy') else out[0]).numpy()\n"
               "so = ctypes.CDLL(lib)\n"
               "def counter(name):\n"
               "    return ctypes.c_longlong.in_dll(so, 'lstm_export_' + name).value\n")
    r = subprocess.run([sys.executable, "-c", prelude + script, str(lib)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_launches_go_through_the_artifacts_policy(artifact):
    """The generated code calls its launches and barriers through __TVMBackendParallelLaunch and
    __TVMBackendParallelBarrier, which TVM's loader fills by dlsym: ours are hidden, so the loader
    cannot replace them, and the policy's own functions are there."""
    so = ctypes.CDLL(str(artifact))
    for hidden in ("__TVMBackendParallelLaunch", "__TVMBackendParallelBarrier"):
        with pytest.raises(ValueError):
            ctypes.c_void_p.in_dll(so, hidden)
    assert so.lstm_export_launch and so.lstm_export_barrier


def _after_ort(tmp_path) -> str:
    """A script's part that defines timed(n): n calls, each right after a run of an ONNX Runtime
    session left as users leave it (a thread per core, pinned, spinning ~40 ms after each run)."""
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 256])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [256, 256], [0.5] * 65536)])
    model = tmp_path / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    return ("import onnxruntime as ort\n"
            f"sess = ort.InferenceSession({str(model)!r}, providers=['CPUExecutionProvider'])\n"
            "feed = {'x': np.ones((256, 256), np.float32)}\n"
            "for _ in range(20): quiet = call()\n"
            "def timed(n):\n"
            "    times, outs = [], []\n"
            "    for _ in range(n):\n"
            "        sess.run(None, feed)\n"
            "        t = time.perf_counter(); outs.append(call()); times.append(time.perf_counter() - t)\n"
            "    return float(np.median(times)), all(np.array_equal(quiet, y) for y in outs)\n"
            "def flag(name, value):\n"
            "    ctypes.c_int.in_dll(so, 'lstm_export_' + name).value = value\n")


@needs_two
def test_a_taken_core_costs_neither_a_slice_per_step_nor_a_bit(artifact, tmp_path):
    """Right after an ONNX Runtime run in the same process, one of the two cores is ORT's for ~40 ms.
    The claiming pool's caller takes the step shares of a worker that is off its core instead of
    waiting a scheduler slice for it at every step: the same bits as quiet and as one task alone,
    and far faster than TVM's launches under the same load (Zen 4 VM: 0.47 ms against 39 ms)."""
    script = _after_ort(tmp_path) + (
        "ours, same = timed(60)\n"
        "flag('one_task', 1); one = call(); flag('one_task', 0)\n"
        "flag('share_cores', 0); tvms, _ = timed(10)\n"
        "print(json.dumps({'same': same, 'same_one': bool(np.array_equal(quiet, one)),\n"
        "                  'ours': ours, 'tvms': tvms}))\n")
    r = _fresh(script, artifact)
    assert r["same"], "the claiming pool computed other numbers under load than quiet"
    assert r["same_one"], "the kernel on one thread computed other numbers than on two"
    assert r["ours"] * 3 < r["tvms"], r


@needs_two
@needs_bf16
def test_the_bf16_engine_runs_alone_while_a_core_is_taken(tmp_path):
    """The bf16/int8 engine (lowp_lstm.c) splits each step over its threads with a barrier, through
    thread_pool.c's launch and barrier: after waits that mean a taken core it runs its launches on
    the calling thread alone, with the same bits, far faster than TVM's launches."""
    import torch
    torch.manual_seed(0)
    T, B, I, H = SHAPE
    onnx_path = export_onnx(LSTM(I, H, 1).eval(), tmp_path / "n.onnx", "native")
    lib = compile_onnx(onnx_path, tmp_path / "out", target="llvm", threads=2, precision="bf16", plan_budget_s=0,
                       progress=False).library
    script = _after_ort(tmp_path) + (
        "ours, same = timed(60)\n"
        "flag('share_cores', 0); tvms, _ = timed(10)\n"
        "print(json.dumps({'same': same, 'alone': counter('alone'), 'ours': ours, 'tvms': tvms}))\n")
    r = _fresh(script, lib)
    assert r["alone"] > 0, r
    assert r["same"], "the engine on one thread computed other numbers than on two"
    assert r["ours"] * 3 < r["tvms"], r


@needs_two
def test_a_forked_child_runs_the_kernel_on_its_own_thread(artifact):
    """The claiming pool's workers are the parent's: a child forked after the pool started has none.
    A launch there ends when its chunks are done, not when every worker has shown up (as TVM's
    does), so the child's calls run every chunk on the calling thread, with the same bits."""
    script = (
        "import os\n"
        "quiet = call()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if all(np.array_equal(quiet, call()) for _ in range(5)) else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "same = bool(np.array_equal(quiet, call()))\n"
        "print(json.dumps({'child': os.waitstatus_to_exitcode(status), 'same': same}))\n")
    assert _fresh(script, artifact) == {"child": 0, "same": True}


@needs_two
@pytest.mark.parametrize("env,workers", [({}, 1), ({"OMP_NUM_THREADS": "1"}, 0), ({"TVM_NUM_THREADS": "3"}, 2)])
def test_the_pool_is_sized_as_tvms_would_be(artifact, env, workers):
    """The claiming pool starts as many workers as TVM's pool would threads, less the caller: the
    cores the artifact was made for, or the user's TVM_NUM_THREADS, else OMP_NUM_THREADS."""
    script = (
        "import os\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "y = call()\n"
        "print(json.dumps({'started': len(os.listdir('/proc/self/task')) - before}))\n")
    assert _fresh(script, artifact, **env) == {"started": workers}


@needs_two
def test_the_pool_stops_spinning_soon_after_a_call(artifact):
    """After a call, TVM's workers spin (sched_yield) before they sleep: 300000 times by default,
    ~140 ms of a core on the Zen 4 VM and seconds when the core is shared, which took half a core
    from the next runtime the bench timed. The artifact sets the spin to ~5 ms unless the user set
    TVM_THREAD_POOL_SPIN_COUNT; TVM's default, set by hand, shows the test can tell."""
    script = (
        "import glob, threading\n"
        "me = str(threading.get_native_id())\n"
        "def others():\n"
        "    return sum(int(open(p).read().split()[0]) for p in glob.glob('/proc/self/task/*/schedstat')\n"
        "               if p.split('/')[4] != me)\n"
        "for _ in range(50): call()\n"
        "c0 = others(); time.sleep(0.1)\n"
        "print(json.dumps({'busy': (others() - c0) / 0.1e9}))\n")
    # the share of a core the process's other threads took in the 100 ms after the last call
    assert _fresh(script, artifact)["busy"] < 0.2
    assert _fresh(script, artifact, TVM_THREAD_POOL_SPIN_COUNT="300000")["busy"] > 0.4
