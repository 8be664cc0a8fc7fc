"""The fast CPU LSTM kernel: its plan from the target, its packing and tiling, and every ISA variant
this machine can run, against ONNX Runtime and the float64 reference."""
import dataclasses
import re

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed")
pytestmark = pytest.mark.tvm

from lstm_export import LSTM  # noqa: E402
from lstm_export.export import export_onnx  # noqa: E402
from lstm_export.runtimes.tvm_lstm.kernels.cpu_plan import (  # noqa: E402
    CpuInfo,
    KernelPlan,
    cover_table,  # noqa: E402
    cpu_info,
    make_plan,
    plan_for,
    sysfs_caches,
)
from lstm_export.runtimes.tvm_lstm.kernels.packing import pack_gates, packed_size, tail_width  # noqa: E402
from lstm_export.runtimes.tvm_lstm.target.targets import cpu_flags, host_target, parse_target  # noqa: E402
from lstm_export.runtimes.tvm_runtime import TvmLlvmRuntime  # noqa: E402

from ..marks import one_fast  # noqa: E402
from .lstm_cases import ALL_OPTIONAL, check, lstm_model  # noqa: E402

KB, MB = 1024, 1024 * 1024


host_flags = cpu_flags


def host_plan(**changes) -> KernelPlan:
    """This machine's plan, with `changes` (e.g. batch_split_bytes=0 for the step split)."""
    return dataclasses.replace(plan_for(host_target()), **changes)


# --- the plan, from target and caches (nothing run) ------------------------------------------------

@pytest.mark.parametrize("target,isa,lanes,mr,l2", [
    ('{"kind": "llvm", "mcpu": "skylake-avx512", "mtriple": "x86_64-linux-gnu"}', "avx512", 16, 6, 1 * MB),
    ("llvm -mcpu=haswell -mtriple=x86_64-linux-gnu", "avx2", 8, 3, 256 * KB),
    ("llvm -mcpu=znver3 -mtriple=x86_64-linux-gnu -num-cores=4", "avx2", 8, 3, 512 * KB),
    ('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1"}', "neon", 4, 6, 1 * MB),
    ('{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}', "neon", 4, 6, 512 * KB),
    ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}', "sse", 4, 3, 512 * KB),
    ('{"kind": "llvm", "mtriple": "riscv64-linux-gnu"}', "portable", 4, 3, 512 * KB),
])
def test_plan_comes_from_the_targets_isa_and_caches(target, isa, lanes, mr, l2, monkeypatch):
    """Lanes and register rows follow the target's ISA (4 accumulators + 1 broadcast per row fit
    the register file); the batch split's threshold is the L2 of the CPU named (a table for a
    cross-compile, sysfs only for this machine)."""
    import lstm_export.runtimes.tvm_lstm.kernels.cpu_plan as cp
    monkeypatch.setattr(cp, "is_host", lambda t: False)  # as on a build machine of another kind
    plan = plan_for(parse_target(target))
    assert (plan.isa, plan.lanes, plan.mr, plan.batch_split_bytes) == (isa, lanes, mr, l2)
    assert 5 * plan.mr <= cp.ISA_REGISTERS[isa][1], "the register tile spills"
    assert plan.ra * 4 * plan.lanes * 4 < 1024, "the tile's first buffer leaves the stack"
    assert plan.ms < plan.mr or plan.mr == 1
    if "num-cores=4" in target:
        assert plan.threads == 4


def test_host_plan_reads_this_machines_caches():
    info = cpu_info(host_target())
    caches = sysfs_caches()
    if caches is None:
        pytest.skip("this machine's sysfs does not describe its caches")
    assert (info.l1d, info.l2, info.l3) == caches and info.cache_source == "sysfs"
    assert plan_for(host_target()).batch_split_bytes == caches[1]


def test_sysfs_caches_per_core(tmp_path):
    """A private L2 counts whole; an L2 shared by 2 CPUs counts half per core; L3 stays whole."""
    def cache(i, level, kind, size, shared):
        d = tmp_path / f"index{i}"
        d.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
            (d / name).write_text(f"{value}\n")
    cache(0, 1, "Data", "48K", "0")
    cache(1, 1, "Instruction", "32K", "0")
    cache(2, 2, "Unified", "2048K", "0-1")
    cache(3, 3, "Unified", "32768K", "0-7")
    assert sysfs_caches(tmp_path) == (48 * KB, 1 * MB, 32 * MB)
    assert sysfs_caches(tmp_path / "missing") is None


@pytest.mark.parametrize("mr,ms", [(6, 4), (3, 2), (4, 3), (2, 2), (1, 1)])
def test_cover_table_covers_every_share(mr, ms):
    """Tiles of mr and ms rows cover any n rows with no tile missing and at most one spare row once
    n > ms (small shares: at most ms - 1)."""
    table = cover_table(mr, ms)
    for n in range(0, 60):
        a, r = divmod(n, mr)
        d, k = table[r, a >= 1]
        assert a + d >= 0 and k >= 0
        rows = (a + d) * mr + k * ms
        assert rows >= n, (n, a, d, k)
        assert rows - n <= (1 if n > ms else max(ms - 1, mr - n if n < mr else 1)), (n, rows)


@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_packing_puts_every_weight_in_its_lane(lanes):
    """pack_gates against a direct loop over (gate, unit, row): block u holds a (K, 4, width) slab
    at u*K*4*lanes; every real weight lands once and everything else is zero."""
    for hidden in (5, 20, 28, 30, 33):
        k = 3
        w = np.random.default_rng(hidden).standard_normal((4 * hidden, k)).astype(np.float32)
        packed = pack_gates(w, hidden, lanes)
        expected = np.zeros_like(packed)
        last_block = (hidden - 1) // lanes
        for g in range(4):
            for j in range(hidden):
                u, v = divmod(j, lanes)
                bw = tail_width(hidden, lanes) if u == last_block else lanes
                assert (4 * bw) % lanes == 0  # the tail's 4 gates fill whole registers
                for row in range(k):
                    expected[u * k * 4 * lanes + row * 4 * bw + g * bw + v] = w[g * hidden + j, row]
        np.testing.assert_array_equal(packed, expected)
        assert packed.size == packed_size(hidden, k, lanes)


# --- the generated code per ISA (compiled, not run) ------------------------------------------------

@pytest.mark.parametrize("target,want,not_want", [
    ("llvm -mcpu=skylake-avx512 -mtriple=x86_64-linux-gnu", r"vfmadd\w*ps\s+[^\n]*%zmm", None),
    ("llvm -mcpu=haswell -mtriple=x86_64-linux-gnu", r"vfmadd\w*ps\s+[^\n]*%ymm", r"%zmm"),
    ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}', r"mulps\s+[^\n]*%xmm", r"%[yz]mm"),
    ('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1"}', r"fmla\s+v\d+\.4s", None),
])
def test_kernel_uses_the_targets_vector_registers(target, want, not_want):
    """Each ISA's kernel is made of that ISA's vector FMAs (zmm, ymm, SSE's xmm, NEON's 4 x f32) and
    never of a wider register the target lacks."""
    import tvm

    from lstm_export.runtimes.tvm_lstm.kernels.cpu import make_cpu_layer
    from lstm_export.runtimes.tvm_lstm.kernels.recurrence import CellSpec
    tgt = parse_target(target)
    spec = CellSpec(40, ("Sigmoid", None, None), ("Tanh", None, None), ("Tanh", None, None))
    f = make_cpu_layer(spec, 20, plan_for(tgt)).with_attr("global_symbol", "layer")
    asm = tvm.compile(tvm.IRModule({"layer": f}), target=tgt).mod.inspect_source("asm")
    assert re.search(want, asm), f"no {want} in the {target} kernel"
    if not_want:
        assert not re.search(not_want, asm), f"{not_want} in the {target} kernel"


@pytest.mark.slow
def test_kernel_allocates_only_its_state_per_call():
    """Per work item the kernel needs a register tile and index arrays; TVM lowers any buffer it
    does not put on the stack to a TVMBackendAllocWorkspace call, which inside the time loop runs
    once per item and step. The lowered layer may allocate only its three per-call buffers (h, c and
    the projection's scratch)."""
    import tvm

    from lstm_export.runtimes.tvm_lstm.kernels.cpu import make_cpu_layer
    from lstm_export.runtimes.tvm_lstm.kernels.recurrence import CellSpec
    lowered = []

    @tvm.instrument.pass_instrument
    class Keep:
        def run_after_pass(self, mod, info):
            if info.name == "tirx.LowerTVMBuiltin":
                lowered.append(str(mod))

    spec = CellSpec(100, ("Sigmoid", None, None), ("Tanh", None, None), ("Tanh", None, None))
    for plan in (host_plan(threads=2), host_plan(threads=2, batch_split_bytes=0)):
        lowered.clear()
        f = make_cpu_layer(spec, 20, plan).with_attr("global_symbol", "layer")
        with tvm.transform.PassContext(instruments=[Keep()]):
            tvm.compile(tvm.IRModule({"layer": f}), target=host_target(2))
        assert lowered and "T.parallel(" in lowered[-1]
        assert lowered[-1].count("TVMBackendAllocWorkspace(") == 3, "a work item allocates from the workspace pool"


# --- the host's kernel on every tile path, against ONNX Runtime ----------------------------------

@pytest.mark.parametrize("split", ["batch", "step"])
@pytest.mark.parametrize("optional", one_fast([ALL_OPTIONAL, ("B",)]), ids=["given-state", "zero-state"])
def test_tiles_at_one_step_and_wide_batches(tmp_path, optional, split):
    """Tiling changes below MR rows (one streaming step: T*B = 1) and h @ R is skipped at the first
    step without an initial state; a batch of 7 mixes full and partial tiles."""
    plan = host_plan() if split == "batch" else host_plan(batch_split_bytes=0)
    check(lstm_model(2, 0, optional, direction="bidirectional"), tmp_path, shapes=((1, 1), (1, 7), (3, 7)), plan=plan)


@pytest.mark.slow  # unit-block tails run in the fast subset: test_isa_variant_against_float64
@pytest.mark.parametrize("hidden,split", one_fast([(30, "step"), (24, "batch"), (28, "batch")], multi=True))
def test_unit_blocks_full_and_narrow(tmp_path, hidden, split):
    """Hidden sizes whose last unit block is 8, 12 or 16 lanes wide with 16 lanes (8, 12 and 14 real
    units; a one-unit tail, full blocks only and a tail only are in test_isa_variant_against_float64),
    on the batched paths (7 and 13 rows) and the small-batch path."""
    plan = host_plan() if split == "batch" else host_plan(batch_split_bytes=0)
    check(lstm_model(2, 0, ALL_OPTIONAL, direction="bidirectional", hidden=hidden), tmp_path,
          shapes=((3, 7), (2, 13), (4, 2)), plan=plan)


@pytest.mark.slow  # the batch split itself runs in the fast subset: test_tiles_at_one_step_and_wide_batches
@pytest.mark.parametrize("threads,batches",
                         one_fast([(3, (13, 20, 23)), (1, (6, 7, 13, 16)), (5, (7, 29))], multi=True))
def test_batch_shares_for_any_core_count(tmp_path, threads, batches):
    """With B >= MR and small weights each of the `threads` cores the kernel is made for runs the
    whole sequence for its own share of the batch rows, in tiles of MR and MS rows; the batches give
    shares of 1 to 16 rows (every remainder mod 6 and mod 3; 2 cores: test_isa_variant_against_float64).
    The process runs 2 threads whatever the kernel assumed; sequence lengths end rows at different
    steps, in both directions."""
    check(lstm_model(2, 0, ALL_OPTIONAL, direction="bidirectional", hidden=20), tmp_path,
          shapes=tuple((3 + k % 3, b) for k, b in enumerate(batches)), plan=host_plan(threads=threads))


@pytest.mark.slow  # the step split itself runs in the fast subset: test_tiles_at_one_step_and_wide_batches
@pytest.mark.parametrize("threads", one_fast([3, 1, 5]))
def test_small_batch_shares_for_any_core_count(tmp_path, threads):
    """Below MR rows each of the `threads` cores keeps one share of the (row, unit block) items,
    walked backward at odd steps: shares that divide evenly, a short last one, a core with none."""
    check(lstm_model(1, 0, ALL_OPTIONAL, hidden=49), tmp_path, shapes=((5, 1), (6, 2), (7, 5)),
          plan=host_plan(threads=threads))


# --- every ISA variant this machine can run, against the float64 reference -------------------------

VARIANTS = {  # name: (target, the CPU flags it needs here)
    "avx512": ("llvm", {"avx512f"}),  # this machine's own -mcpu, where it has AVX-512
    "avx2": ("llvm -mcpu=haswell", {"avx2", "fma"}),
    "sse": ('{"kind": "llvm", "mcpu": "x86-64"}', {"sse2"}),
}


def _variant_target(name: str) -> str:
    target, needs = VARIANTS[name]
    missing = needs - host_flags()
    if missing:
        pytest.skip(f"no {'/'.join(sorted(missing)).upper()} on this CPU")
    if name == "avx512" and plan_for(host_target()).isa != "avx512":
        pytest.skip("no AVX-512 on this CPU")
    return target


@pytest.mark.parametrize("variant,shape,split", [
    pytest.param(v, s, sp, marks=[] if s == "mixed" else [pytest.mark.slow])
    for v in VARIANTS for s, sp in (("mixed", "batch"), ("full", "step"), ("tail", "batch"))])
def test_isa_variant_against_float64(tmp_path, variant, shape, split):
    """One kernel per ISA, bidirectional with initial state and sequence lengths, against
    lstm_export.reference in float64. Hidden sizes: full unit blocks and a narrow last one (mixed),
    only full blocks, only the narrow block (tail); batches of 1 and 2 (row path) and 7-23 rows give
    every remainder of MR and MS in the 2 cores' shares; both splits (the step split on full blocks,
    whose items interleave with the tail's elsewhere: test_unit_blocks_full_and_narrow)."""
    from lstm_export.runtimes.numpy_reference import NumpyReferenceRuntime
    target = _variant_target(variant)
    lanes = plan_for(parse_target(target)).lanes
    hidden = {"mixed": 2 * lanes + 1, "full": 2 * lanes, "tail": 3}[shape]
    plan = plan_for(parse_target(target, threads=2))
    if split == "step":
        plan = dataclasses.replace(plan, batch_split_bytes=0)
    m = LSTM(5, hidden, 1, bidirectional=True).eval()
    path = export_onnx(m, tmp_path / "n.onnx", "native", initial_state=True, lengths=True)
    rt = TvmLlvmRuntime(target=target, plan=plan)
    rt.prepare(path)
    ref = NumpyReferenceRuntime(model=m)
    ref.prepare()
    rng = np.random.default_rng(hidden)
    for T, B in ((6, 1), (5, 2), (4, 7), (3, 11), (5, 13), (4, 16), (3, 23)):
        feeds = {"input": rng.standard_normal((T, B, 5)).astype(np.float32),
                 "h_0": rng.standard_normal((2, B, hidden)).astype(np.float32),
                 "c_0": rng.standard_normal((2, B, hidden)).astype(np.float32),
                 "lengths": rng.integers(1, T + 1, B).astype(np.int32)}
        expected = ref.run(feeds)
        for k, v in rt.run(feeds).items():
            np.testing.assert_allclose(v, expected[k], atol=2e-5, err_msg=f"{variant} {k} at T={T}, B={B}")
    rt.release()


def test_plan_object_is_validated():
    info = CpuInfo("avx2", 8, 16, 32 * KB, 512 * KB, 0, 2, "default")
    plan = make_plan(info)
    assert (plan.lanes, plan.mr, plan.ms, plan.ra, plan.threads) == (8, 3, 2, 3, 2)
    with pytest.raises(ValueError, match="bad register tile"):
        dataclasses.replace(plan, ms=4)
