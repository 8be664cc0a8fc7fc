"""GPU timings of the native LSTM: torch.nn.LSTM on cuDNN (TF32 off), tvm-cuda, ort-cuda where installed.

Two halves, because a GPU machine may have no TVM compiler (its library is ~250 MB):
- `prepare(DIR)`, where TVM is installed: for each hidden size, an LSTM (input = hidden, one layer,
  weights drawn by NumPy from a seed, so the GPU side can draw them again instead of carrying
  them) exported as the native ONNX graph and compiled for CUDA (DIR/hH/model.so + meta.json; time
  and batch stay symbolic, so one artifact serves every shape).
- `run(DIR)`, on the GPU: needs torch, and for tvm-cuda only TVM's runtime (`TVM_USE_RUNTIME_LIB=1`
  with libtvm_runtime and libtvm_runtime_cuda). Every runtime gets the same weights (read from the
  ONNX file) and inputs; its outputs are checked against torch.nn.LSTM in float64 on the CPU before
  it is timed. Inputs and outputs stay on the GPU while timing: the numbers are the kernels plus
  each runtime's own call overhead, not host copies. Timing: warm-up, then blocks of calls between
  device synchronizations; median and p90 of the per-call time over the blocks.

`python -m lstm_export.harness.gpu_bench prepare DIR [--arch sm_90]` / `python -m lstm_export.harness.gpu_bench run DIR
--json F --markdown F`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from lstm_export.common.agreement import output_error
from lstm_export.common.errors import UserError, describe
from lstm_export.common.timing import ratio_to_best, time_runs

HIDDENS = (256, 512, 1024)
BATCHES = (1, 8, 64)
STEPS = 64


def params(h: int, seed: int = 0):
    """ONNX-ordered (W (4H, H), R (4H, H), B (8H,)) float32, uniform in +-1/sqrt(H) as torch
    initializes an LSTM; NumPy's generator gives the same numbers on every machine."""
    rng = np.random.default_rng(seed + h)
    k = 1 / np.sqrt(h)
    return tuple(rng.uniform(-k, k, shape).astype(np.float32) for shape in ((4 * h, h), (4 * h, h), (8 * h,)))


def prepare(out_dir, hiddens=HIDDENS, arch: str = "sm_90", seed: int = 0) -> list[Path]:
    import tempfile

    from lstm_export.export import export_onnx
    from lstm_export.runtimes.tvm_lstm import compile_onnx
    done = []
    for h in hiddens:
        d = Path(out_dir) / f"h{h}"
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export_onnx(_ours(_torch_lstm(*params(h, seed), "float32", "cpu")), Path(tmp) / "model.onnx",
                                    "native")
            compile_onnx(onnx_path, d, target="cuda", arch=arch, progress=False)
        (d / "weights.json").write_text(json.dumps({"hidden": h, "seed": seed,
                                                     "drawn_by": "lstm_export.harness.gpu_bench.params"}))
        done.append(d)
    return done


def _torch_lstm(w, r, b, dtype, device):
    """torch.nn.LSTM with ONNX weights (gates i, o, f, c -> torch's i, f, g, o)."""
    import torch
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    from lstm_export.export.layers import onnx_to_torch_gates as to_torch
    h = r.shape[1]
    m = torch.nn.LSTM(w.shape[1], h, 1)
    with torch.no_grad():
        m.weight_ih_l0.copy_(torch.from_numpy(to_torch(w, h)))
        m.weight_hh_l0.copy_(torch.from_numpy(to_torch(r, h)))
        m.bias_ih_l0.copy_(torch.from_numpy(to_torch(b[:4 * h], h)))
        m.bias_hh_l0.copy_(torch.from_numpy(to_torch(b[4 * h:], h)))
    return m.to(dtype=dtype, device=device).eval()


def _ours(m):
    """Our LSTM (what export_onnx takes) with a torch.nn.LSTM's weights (the same names)."""
    from lstm_export import LSTM
    ours = LSTM(m.input_size, m.hidden_size, m.num_layers).eval()
    ours.load_state_dict({k: v.detach().cpu().float() for k, v in m.state_dict().items()})
    return ours


def run(art_dir, batches=BATCHES, steps: int = STEPS, atol: float = 1e-4) -> dict:
    import torch
    if not torch.cuda.is_available():
        raise UserError(
            "no CUDA device here: make the artifacts with `prepare DIR` and run `run DIR` on the GPU machine"
        )
    if not any(Path(art_dir).glob("h*/model.so")):
        raise UserError(f"{art_dir} holds no artifacts (h<hidden>/model.so); make them with `prepare {art_dir}`")
    torch.backends.cudnn.allow_tf32 = False  # full FP32, as TVM and ORT compute
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "tf32": False, "steps": steps, "timings": []}
    tvm_state = _tvm_setup()
    report["tvm_runtime"] = tvm_state.get("version") or tvm_state["error"]
    for d in sorted(Path(art_dir).glob("h*"), key=lambda p: int(p.name[1:])):
        spec = json.loads((d / "weights.json").read_text())
        w, r, b = params(spec["hidden"], spec["seed"])
        h = r.shape[1]
        cudnn = _torch_lstm(w, r, b, torch.float32, dev)
        oracle = _torch_lstm(w, r, b, torch.float64, "cpu")
        vm = _tvm_vm(tvm_state, d)
        for bsz in batches:
            x = np.random.default_rng(bsz).standard_normal((steps, bsz, h)).astype(np.float32)
            with torch.no_grad():
                want = oracle(torch.from_numpy(x).double())[0].numpy()
                xt = torch.from_numpy(x).to(dev)
                entries = {"torch.nn.LSTM cuDNN": (lambda m=cudnn, x=xt: m(x)[0], lambda o: o.cpu().numpy())}
            if isinstance(vm, str):
                entries["tvm-cuda native"] = vm
            else:
                xv = tvm_state["tvm"].runtime.tensor(x, tvm_state["tvm"].cuda(0))
                entries["tvm-cuda native"] = (lambda vm=vm, xv=xv: vm["main"](xv), lambda o: o[0].numpy())
            entries["ort-cuda native"] = _ort_cuda(cudnn, x)
            rows = []
            for name, entry in entries.items():
                row = {"entry": name, "hidden": h, "batch": bsz, "steps": steps, "status": "ok"}
                if isinstance(entry, str):
                    row["status"] = f"unavailable: {entry}"
                else:
                    fn, to_numpy = entry
                    try:
                        with torch.no_grad():
                            got = to_numpy(fn())
                            err = output_error("output", got, want, atol, 0.0)
                            row["max_err"] = err.max_abs
                            if not err.passed:
                                row["status"] = "mismatch"
                            else:
                                secs = time_runs(fn, warmup=5, min_runs=20, min_s=0.0, max_runs=20,
                                                 sync=torch.cuda.synchronize, block_s=0.02)
                                row["median_us"] = round(float(np.median(secs)) * 1e6, 2)
                                row["p90_us"] = round(float(np.percentile(secs, 90)) * 1e6, 2)
                                row["us_per_step"] = round(row["median_us"] / steps, 3)
                    except Exception as e:  # one broken entry must not lose the others' numbers
                        row["status"] = f"error: {describe(e, 120)}"
                rows.append(row)
            peers = [x.get("median_us") for x in rows if x["entry"] != "tvm-cuda native"]
            for row in rows:
                if "median_us" in row:
                    row["ratio_to_best_peer"] = ratio_to_best(row["median_us"], peers)
                print(json.dumps(row), flush=True)
            report["timings"] += rows
    return report


def _tvm_setup() -> dict:
    try:
        import tvm
        from tvm.runtime.vm import VirtualMachine
        if tvm.base._RUNTIME_ONLY and "tvm_runtime_cuda" not in tvm.base._LOADED_LIBS:
            # runtime-only TVM loads no device backends: the CUDA module loader registers itself
            # when its library is loaded
            from tvm_ffi.libinfo import load_lib_ctypes
            runtime_dir = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
            tvm.base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
                package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
            if not hasattr(tvm.target._ffi_api, "TargetCurrent"):
                # Loading a CUDA module asks tvm.support.nvcc for the compute version, which first
                # looks for a current target: a compiler function. Without one it asks the device.
                tvm.target._ffi_api.TargetCurrent = lambda allow_none=True: None
        return {"tvm": tvm, "VirtualMachine": VirtualMachine, "version": getattr(tvm, "__version__", "?")}
    except Exception as e:  # no TVM runtime here
        return {"error": f"TVM runtime not importable: {type(e).__name__}: {e}"}


def _tvm_vm(state, d):
    if "error" in state:
        return state["error"]
    try:
        tvm = state["tvm"]
        return state["VirtualMachine"](tvm.runtime.load_module(str(d / "model.so")), tvm.cuda(0))
    except Exception as e:
        import traceback
        traceback.print_exc()
        return describe(e, 120)


def _ort_cuda(model, x):
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (onnxruntime-gpu is not installed here)"
    import tempfile

    from lstm_export.export import export_onnx
    path = export_onnx(_ours(model), Path(tempfile.mkdtemp()) / "model.onnx", "native")
    s = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    io = s.io_binding()
    io.bind_ortvalue_input(s.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for o in s.get_outputs():
        io.bind_output(o.name, "cuda")

    def call():
        s.run_with_iobinding(io)
        return io
    return call, lambda io_: io_.copy_outputs_to_cpu()[0]


def markdown(report: dict) -> str:
    rows = [f"Device: {report['device']}; torch {report['torch']}, cuDNN {report['cudnn']}, TF32 off; "
            f"TVM runtime {report.get('tvm_runtime')}; float32, T={report['steps']}, input = hidden, 1 layer; "
            "inputs and outputs on the GPU; median of 20 timed blocks after warm-up; ratio = median / best "
            "peer's median (peers: cuDNN, ort-cuda).", "",
            "| hidden | batch | runtime | median us | p90 us | us per step | vs best peer | max err | status |",
            "|---|---|---|---|---|---|---|---|---|"]
    f = lambda r, k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"  # noqa: E731
    for r in report["timings"]:
        rows.append(f"| {r['hidden']} | {r['batch']} | {r['entry']} | {f(r, 'median_us', '.1f')} | "
                    f"{f(r, 'p90_us', '.1f')} | {f(r, 'us_per_step', '.2f')} | {f(r, 'ratio_to_best_peer', '.2f')} | "
                    f"{f(r, 'max_err', '.1e')} | {r['status']} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lstm_export.harness.gpu_bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare", help="export and compile the GPU artifacts (needs TVM's compiler)")
    a.add_argument("dir")
    a.add_argument("--arch", default="sm_90")
    b = sub.add_parser("run", help="time them on this machine's GPU")
    b.add_argument("dir")
    b.add_argument("--json", default=None)
    b.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    try:
        return _main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args) -> int:
    if args.cmd == "prepare":
        for d in prepare(args.dir, arch=args.arch):
            print(d)
        return 0
    report = run(args.dir)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
