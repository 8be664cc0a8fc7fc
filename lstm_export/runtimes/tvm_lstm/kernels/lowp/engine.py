"""compile --precision bf16 (and int8): LSTM layers with bf16 weights and fp32 accumulation, or
int8 weights where they pay (lowp_lstm.c).

The kernel is C with the AMX and AVX-512 BF16 intrinsics, because TVM 0.27's TIR cannot emit
VDPBF16PS (its BF16 legalization rewrites the bfloat16x32 operands the LLVM intrinsic wants) and
has no AMX schedule. A TIR PrimFunc calls it by `call_extern`; its object is linked into model.so
beside the thread-pool constructor, and it runs on TVM's own thread pool.

Each layer's engine and work split (`LowpLayer`) is chosen by timing the candidates on the layer's
own shapes on this machine, as plan_select does for fp32; the derived rule (`derived`) stands for
a cross-compile, symbolic shapes or a zero budget. The rule, from the Intel Xeon (AMX) VM:
AMX where the CPU has it, except for one step of under 16 rows (AVX-512 BF16 there: an AMX tile
would be mostly padding; one step of the 2-layer H256 model 37 us against 41-45 us with AMX); the
projection first below 16 batch rows when there is more than one step (a step's tile would be
15/16 padding, and x_t @ W would stream W every step); the batch split while the bf16 weights fit
one core's L2, else the unit split with a barrier per step.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lstm_export.common.cbuild import CBuildError, cached_library, compile_c
from lstm_export.common.errors import UserError

from . import pack

SOURCE = Path(__file__).with_name("lowp_lstm.c")
SYMBOL = "lstm_export_bf16_layer"
CFLAGS = ["-O3", "-fPIC", "-fno-strict-aliasing"]
# the C file's flags
HAS_STATE, HAS_PEEP, HAS_LENS, REVERSE, ENGINE_AMX, SPLIT_BATCH, PROJECT_FIRST, MODE_AUTO = 1, 2, 4, 8, 16, 32, 64, 128
ENGINE_INT8 = 256
MODES = {"unit": 0, "batch": SPLIT_BATCH, "project": PROJECT_FIRST, "auto": MODE_AUTO}
MARGIN = 0.05  # as plan_select: another candidate replaces the derived one only when 5% faster


@dataclass(frozen=True)
class LowpLayer:
    """How one layer runs: engine "amx" or "dot" (AVX-512 BF16), or with int8 weights (compile
    --precision int8) "vnni" (VPDPBUSD) or "amx8" (AMX TDPBUSD; not with the projection first);
    mode "unit" (unit blocks shared
    out, a barrier per step), "batch" (each core its own rows, no barrier), "project" (x @ W for
    every step first, then the unit split) or "auto" (T or B symbolic: `derived`'s rule, which the
    kernel applies at each call to the batch it gets)."""

    engine: str
    mode: str

    @property
    def name(self) -> str:
        return f"{self.engine}/{self.mode}"

    def flags(self, l2_bytes: int = 0) -> int:
        """The kernel's flags (with "auto", one core's L2 in KB from bit 16 on: the rule's bound)."""
        auto = (l2_bytes // 1024) << 16 if self.mode == "auto" else 0
        engine = {"amx": ENGINE_AMX, "dot": 0, "vnni": ENGINE_INT8, "amx8": ENGINE_INT8 | ENGINE_AMX}[self.engine]
        return engine | MODES[self.mode] | auto

    @property
    def int8(self) -> bool:
        return self.engine in ("vnni", "amx8")


def _has(target, llvm_names: tuple[str, ...], cpu_names: tuple[str, ...]) -> bool:
    """Whether the llvm target's -mcpu/-mattr enable all of `llvm_names`, or, for a target that is
    this machine, its CPU reports all of `cpu_names` (/proc/cpuinfo). LLVM's name for a CPU can
    undersell it: this KVM guest's Xeon is `rocketlake` to LLVM, which has no bf16 or AMX, while
    the CPU reports both."""
    from tvm.target import codegen

    from ...target.targets import cpu_flags
    from ..cpu_plan import is_host

    def llvm(f):
        try:
            return bool(codegen.target_has_features(f, target))
        except Exception:  # noqa: BLE001 -- an LLVM that does not know the name: not there
            return False
    if all(llvm(f) for f in llvm_names):
        return True
    return is_host(target) and not target.attrs.get("mattr") and set(cpu_names) <= cpu_flags()


def features(target) -> tuple[bool, bool]:
    """(AVX-512 BF16, AMX-BF16) on the target (or this CPU)."""
    return (_has(target, ("avx512bf16",), ("avx512_bf16",)),
            _has(target, ("amx-bf16", "amx-tile"), ("amx_bf16", "amx_tile")))


def has_amx_int8(target) -> bool:
    """AMX-INT8 (TDPBUSD) on the target (or this CPU)."""
    return _has(target, ("amx-int8", "amx-tile"), ("amx_int8", "amx_tile"))


def has_vnni(target) -> bool:
    """AVX-512 VNNI (VPDPBUSD), the int8 engine's instruction, on the target (or this CPU)."""
    return _has(target, ("avx512vnni",), ("avx512_vnni",))


def require(target, precision: str = "bf16") -> tuple[bool, bool]:
    """(AVX512-BF16, AMX) on the target; a UserError where it cannot run `precision` at all."""
    dot, amx = features(target)
    if precision == "int8":
        if not has_vnni(target):
            mcpu = target.attrs.get("mcpu") or "this CPU"
            raise UserError(f"--precision int8 needs a CPU with AVX-512 VNNI; {mcpu} has none: compile at fp32 "
                            "(the default), or name a target that has it (--target 'llvm -mcpu=icelake-server')")
        return dot, amx
    if not dot:
        mcpu = target.attrs.get("mcpu") or "this CPU"
        raise UserError(f"--precision bf16 needs a CPU with AVX512-BF16 (or AMX-BF16); {mcpu} has neither: "
                        "compile at fp32 (the default), or name a target that has it "
                        "(--target 'llvm -mcpu=sapphirerapids' or znver4)")
    return dot, amx


def derived(T: int | None, B: int | None, I: int, H: int, amx: bool, l2_bytes: int, int8: bool = False,
            dot: bool = True, amx8: bool = False) -> LowpLayer:
    """The rule (module docstring) for T steps of B rows (None: symbolic; the kernel applies the
    rule to the shapes of each call, lowp_lstm.c's MODE_AUTO). int8 (compile --precision int8):
    int8 weights below 16 rows, where a step reads every weight for a row or two and int8 halves
    those bytes (T256 B1 I512 H512: 2.7 ms against 6.9 with AMX bf16); at 16 rows and more AMX int8
    where the CPU has it (T64 B64: 7.9 ms against 12.0 with AMX bf16), else the bf16 engines
    (VPDPBUSD lost there: 27.9 ms). Symbolic: AMX int8 if there, which the kernel turns into
    VPDPBUSD below 16 rows."""
    engine = "amx" if amx else "dot"
    if int8 and (T is None or B is None or B >= 16) and amx8:
        engine = "amx8"
    elif int8 and (T is None or B is None or B < 16 or not (amx or dot)):
        engine = "vnni"
    if T is None or B is None:
        return LowpLayer(engine, "auto")
    if B < 16 and T == 1:
        return LowpLayer("vnni" if int8 else "dot", "unit")
    if B < 16:
        return LowpLayer(engine, "project")
    weights = (pack.ceil_to(I, 32) + pack.ceil_to(H, 32)) * 4 * pack.ceil_to(H, 16) * 2
    return LowpLayer(engine, "batch" if weights <= l2_bytes else "unit")


def candidates(B: int, amx: bool, int8: bool = False, dot: bool = True, amx8: bool = False) -> list[LowpLayer]:
    engines = (["amx"] if amx else []) + (["dot"] if dot else []) + (["vnni"] if int8 else []) + \
        (["amx8"] if int8 and amx8 else [])
    return [LowpLayer(e, m) for e in engines for m in ("project", "unit", "batch")
            if not (m == "batch" and B < (32 if e in ("amx", "amx8") else 2 if e == "dot" else 6))
            and not (e == "amx8" and m == "project")]


def object_file(workdir: str | Path, cc: str) -> Path:
    """Compiles the kernel with `cc` into an object to link into model.so."""
    obj = Path(workdir) / "lstm_export_lowp.o"
    with _cc_errors(cc):
        compile_c(cc, ["-c", *CFLAGS, "-o", str(obj), str(SOURCE)])
    return obj


@contextlib.contextmanager
def _cc_errors(cc: str):
    try:
        yield
    except CBuildError as e:
        raise UserError(f"{cc} could not compile the reduced-precision LSTM kernel ({SOURCE.name}): {e}; "
                        "it needs GCC 12 or Clang 14 or newer (AMX and AVX512-BF16 intrinsics)") from None


_LIB_LOCK = threading.Lock()


def host_library(cc: str):
    """The kernel as a shared library in this process, for timing candidates (cached per source)."""
    import tvm  # noqa: F401 -- loads libtvm_runtime with its symbols global: the kernel's thread pool
    with _LIB_LOCK, _cc_errors(cc):  # the key holds the compiler: a change of CC is a new build
        lib = ctypes.CDLL(str(cached_library("lowp", "lowp_lstm", SOURCE, cc, ["-shared", *CFLAGS])))
    fn = getattr(lib, SYMBOL)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 11 + [ctypes.c_int64] * 6
    return fn


def packed(layer: LowpLayer, w: np.ndarray, hidden: int) -> np.ndarray:
    """The layer's weights in its engine's packing."""
    return pack.pack_int8(w, hidden) if layer.int8 else pack.pack_weights(w, hidden)


def measure(fn, T: int, B: int, I: int, H: int, layers: list[LowpLayer], threads: int, budget_s: float,
            rounds: int = 3) -> dict[str, float]:
    """Median ms of each candidate on random data of the layer's shapes, interleaved rounds; a
    candidate not started within the budget is left out."""
    from ...target.thread_pool import pool_threads
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    w_f, r_f = (rng.standard_normal((4 * H, k)).astype(np.float32) * 0.1 for k in (I, H))
    packed = {False: (pack.pack_weights(w_f, H), pack.pack_weights(r_f, H))}
    if any(c.int8 for c in layers):
        packed[True] = (pack.pack_int8(w_f, H), pack.pack_int8(r_f, H))
    bias, p = pack.pack_bias(np.zeros(4 * H, np.float32), H), pack.pack_peepholes(None, H)
    y, hn, cn = np.empty((T, B, H), np.float32), np.empty((B, H), np.float32), np.empty((B, H), np.float32)
    state, lens = np.zeros((1, H), np.float32), np.zeros(1, np.int32)
    ptrs = {k: [a.ctypes.data for a in (x, *wr, bias, p, state, state, lens, y, hn, cn)] for k, wr in packed.items()}
    samples: dict[str, list[float]] = {c.name: [] for c in layers}
    end = time.perf_counter() + budget_s
    result: dict[str, float] = {}

    def run():
        for rnd in range(rounds):
            for c in layers:
                if time.perf_counter() > end:
                    return
                call = lambda c=c: fn(*ptrs[c.int8], T, B, I, H, c.flags(), threads)  # noqa: E731
                if rnd == 0:
                    call()  # warm-up
                t0 = time.perf_counter()
                n = 0
                while n < 3 or (time.perf_counter() - t0 < 0.05 and n < 200):
                    s = time.perf_counter()
                    if call() != 0:
                        raise UserError("the bf16 LSTM kernel could not allocate its scratch memory")
                    samples[c.name].append(time.perf_counter() - s)
                    n += 1
    with pool_threads(threads):
        worker = threading.Thread(target=run)  # a fresh thread: its TVM pool starts at `threads`
        worker.start()
        worker.join()
    for name, s in samples.items():
        if s:
            result[name] = round(float(np.median(s)) * 1e3, 4)
    return result


def choose(base: LowpLayer, timed: dict[str, float]) -> LowpLayer:
    """The derived layer unless another timed candidate is at least MARGIN faster."""
    best = min(timed, key=timed.get, default=base.name)
    if base.name in timed and timed[best] > timed[base.name] * (1 - MARGIN):
        return base
    engine, mode = best.split("/")
    return LowpLayer(engine, mode)


def record(layer: LowpLayer, how: str, timed: dict[str, float], shape) -> dict:
    """One layer's entry in meta.json's `lowp_layers`."""
    return {**asdict(layer), "chosen_by": how, "timed_ms": timed, "shape_TBIH": list(shape)}
