"""The fast CPU kernel's plan: vector width, register tile and work split, derived from the target.

Nothing here is tuned to one machine. The ISA comes from the llvm target's features (what its
-mcpu/-mattr enable), the cache sizes from this machine's sysfs when the target is this machine,
and from a table of CPU models (else conservative defaults) when cross-compiling. `KernelPlan` is
computed once per compile and passed to every layer; tests build plans directly.

Invariants the kernel relies on:
- 4 * tail granule (lanes / 4) is a whole number of registers, so the narrow last unit block's four
  gates fill whole registers;
- a register tile of `mr` rows needs 4*mr accumulators plus one broadcast register per row (the
  weight vectors are FMA memory operands): 5*mr <= vector registers, so nothing spills;
- a tile's first stack buffer (`ra` rows of 4*lanes floats) stays under the 1 KB below which TVM
  keeps a buffer on the stack instead of a workspace allocation per work item.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

KB = 1024
MB = 1024 * KB

# (float32 lanes, vector registers) per ISA family
ISA_REGISTERS = {
    "avx512": (16, 32),
    "avx2": (8, 16),  # AVX2 + FMA (and AVX alone: same registers, no FMA)
    "neon": (4, 32),
    "sse": (4, 16),  # x86-64's baseline
    "portable": (4, 16),  # anything else: LLVM legalizes 4-wide vectors for the target
}

# Per-core L1d / L2 and the shared L3 of CPU models a cross-compile may name (LLVM -mcpu names),
# from the vendors' documentation; a model not listed gets DEFAULT_CACHES.
CACHES_BY_MCPU = {
    "haswell": (32 * KB, 256 * KB, 8 * MB), "broadwell": (32 * KB, 256 * KB, 8 * MB),
    "skylake": (32 * KB, 256 * KB, 8 * MB), "skylake-avx512": (32 * KB, 1 * MB, 16 * MB),
    "cascadelake": (32 * KB, 1 * MB, 16 * MB), "icelake-server": (48 * KB, 1280 * KB, 32 * MB),
    "sapphirerapids": (48 * KB, 2 * MB, 64 * MB), "rocketlake": (48 * KB, 512 * KB, 16 * MB),
    "znver1": (32 * KB, 512 * KB, 8 * MB), "znver2": (32 * KB, 512 * KB, 16 * MB),
    "znver3": (32 * KB, 512 * KB, 32 * MB), "znver4": (32 * KB, 1 * MB, 32 * MB),
    "neoverse-n1": (64 * KB, 1 * MB, 32 * MB), "neoverse-v1": (64 * KB, 1 * MB, 32 * MB),
    "neoverse-n2": (64 * KB, 1 * MB, 32 * MB), "neoverse-v2": (64 * KB, 2 * MB, 64 * MB),
    "cortex-a72": (32 * KB, 512 * KB, 0), "apple-m1": (128 * KB, 4 * MB, 0),
}
DEFAULT_CACHES = (32 * KB, 512 * KB, 8 * MB)


@dataclass(frozen=True)
class CpuInfo:
    """What the plan is derived from: the target's ISA and the caches of the CPU it runs on."""

    isa: str
    lanes: int
    vector_registers: int
    l1d: int  # bytes per core
    l2: int  # bytes per core
    l3: int  # bytes, shared (0: none or unknown)
    cores: int
    cache_source: str  # "sysfs", "table:<mcpu>" or "default"

    def describe(self) -> str:
        return (f"{self.isa} ({self.lanes} lanes, {self.vector_registers} registers), L1d {self.l1d // KB} KB, "
                f"L2 {self.l2 // KB} KB, L3 {self.l3 // MB} MB ({self.cache_source}), {self.cores} cores")


@dataclass(frozen=True)
class KernelPlan:
    """How the fast CPU kernel is laid out for one target (see cpu.make_cpu_layer)."""

    lanes: int  # float32 lanes of a vector register = units per unit block
    mr: int  # batch rows of a full register tile
    ms: int  # rows of the smaller tile that covers a share's remainder
    ra: int  # rows of a tile held in its first stack buffer
    threads: int  # cores the kernel is made for (the target's num-cores)
    batch_split_bytes: int  # packed W+R up to this (one core's L2): each core runs its own batch rows
    unit_major_bytes: int  # projection weights above this are split between cores, not shared
    isa: str = "avx512"
    info: CpuInfo | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.lanes % 4 and self.lanes != 1:
            raise ValueError(f"lanes={self.lanes} must be a multiple of 4")
        if not 1 <= self.ms <= self.mr or self.ra < 1:
            raise ValueError(f"bad register tile: mr={self.mr}, ms={self.ms}, ra={self.ra}")


def make_plan(info: CpuInfo, threads: int | None = None) -> KernelPlan:
    """The plan for `info`: lanes and tile rows from the register file, the split from the caches."""
    lanes, regs = info.lanes, info.vector_registers
    mr = max(1, min(6, regs // 5))  # 4 accumulators + 1 broadcast per row (see the module docstring)
    ms = max(1, mr - mr // 3)  # 6 -> 4, 3 -> 2: remainders are covered with at most one spare row
    row_bytes = 4 * lanes * 4
    ra = max(1, min(mr, (1024 - 1) // row_bytes))
    return KernelPlan(lanes=lanes, mr=mr, ms=ms, ra=ra, threads=max(1, threads or info.cores),
                      batch_split_bytes=info.l2, unit_major_bytes=max(info.l2 // 8, 32 * KB), isa=info.isa, info=info)


# Size thresholds that decide alike for every layer: a threshold of ALL is above any layer's
# weights (always a batch split; never a unit-major projection), NONE below them.
ALL, NONE = 1 << 62, 0


def layer_plan(spec, k_dim: int, plan: KernelPlan) -> KernelPlan:
    """`plan` with its size thresholds replaced by what they decide for this layer (batch split or
    not, projection unit-major or not), as ALL or NONE: two plans that lay this layer out alike
    become one plan, so they build one kernel (cpu_layer's cache) and one module (plan_select
    skips timing a candidate whose module is the same as one already timed)."""
    from .cpu_cells import KernelCell
    from .packing import packed_size
    cell = KernelCell(spec)
    passes = cell.with_offsets(plan.lanes, k_dim)
    w_size, r_size = (sum(packed_size(q.units, n, plan.lanes) for q in passes) for n in (k_dim, cell.hidden))
    batch_split = (w_size + r_size) * 4 <= plan.batch_split_bytes  # the rule make_cpu_layer reads
    majors = {k_dim * packed_size(q.units, 1, plan.lanes) * 4 > plan.unit_major_bytes for q in passes}
    unit_major = plan.unit_major_bytes if len(majors) > 1 else NONE if majors.pop() else ALL
    return replace(plan, batch_split_bytes=ALL if batch_split else NONE, unit_major_bytes=unit_major)


def isa_of(target) -> str:
    """The ISA family the llvm `target` enables (its -mcpu and -mattr, as LLVM reads them)."""
    from tvm.target import codegen
    triple = str(target.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())

    def has(feature):
        try:
            return bool(codegen.target_has_features(feature, target))
        except Exception:  # noqa: BLE001 -- an LLVM without that feature name: not there
            return False
    if triple.startswith(("x86_64", "i686", "i386")):
        if has("avx512f"):
            return "avx512"
        if has("avx2") or has("avx"):
            return "avx2"
        return "sse"
    if triple.startswith(("aarch64", "arm64")) and (has("neon") or bool(target.attrs.get("feature.has_asimd"))):
        return "neon"
    return "portable"


def is_host(target) -> bool:
    """Whether `target` is this machine (same triple, and this CPU or none named)."""
    from tvm.target import codegen
    triple = target.attrs.get("mtriple")
    mcpu = target.attrs.get("mcpu")
    same_triple = triple is None or str(triple) == codegen.llvm_get_system_triple()
    return same_triple and (mcpu is None or str(mcpu) == codegen.llvm_get_system_cpu())


def sysfs_caches(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> tuple[int, int, int] | None:
    """(L1d, L2 per core, L3) of this machine from sysfs, or None where sysfs does not say.
    A cache shared by n CPUs counts 1/n per core, except the last level, which stays whole."""
    found = {}
    try:
        for d in sorted(root.glob("index*")):
            level = int((d / "level").read_text())
            kind = (d / "type").read_text().strip()
            if kind == "Instruction":
                continue
            size = _size((d / "size").read_text().strip())
            shared = _count_cpus((d / "shared_cpu_list").read_text().strip()) if (d / "shared_cpu_list").exists() else 1
            found[level] = size if level >= 3 else size // max(1, shared)
    except (OSError, ValueError):
        return None
    if 1 not in found or 2 not in found:
        return None
    return found[1], found[2], found.get(3, 0)


def _size(text: str) -> int:
    units = {"K": KB, "M": MB, "G": 1024 * MB}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def _count_cpus(cpu_list: str) -> int:
    n = 0
    for part in cpu_list.split(","):
        a, _, b = part.partition("-")
        n += int(b) - int(a) + 1 if b else 1
    return n


def cpu_info(target) -> CpuInfo:
    """CpuInfo for an llvm target: ISA from its features; caches from sysfs when it is this machine,
    else from CACHES_BY_MCPU, else DEFAULT_CACHES."""
    isa = isa_of(target)
    lanes, regs = ISA_REGISTERS[isa]
    mcpu = str(target.attrs.get("mcpu", "") or "")
    caches, source = None, "default"
    if is_host(target):
        caches, source = sysfs_caches(), "sysfs"
    if caches is None and mcpu in CACHES_BY_MCPU:
        caches, source = CACHES_BY_MCPU[mcpu], f"table:{mcpu}"
    if caches is None:
        caches, source = DEFAULT_CACHES, "default"
    cores = int(target.attrs.get("num-cores", 0) or 0) or len(os.sched_getaffinity(0))
    return CpuInfo(isa, lanes, regs, *caches, cores=cores, cache_source=source)


def plan_for(target) -> KernelPlan:
    """The kernel plan for an llvm target (its num-cores, or this machine's usable CPUs)."""
    info = cpu_info(target)
    return make_plan(info, info.cores)


def cover_table(mr: int, ms: int) -> dict[tuple[int, bool], tuple[int, int]]:
    """How tiles of mr and ms rows cover n = a*mr + r rows: for each remainder r and whether a >= 1,
    (d, k): a + d tiles of mr rows and k of ms rows, the fewest spare rows first, then the fewest
    tiles. With mr=6, ms=4 every n > 2 is covered with at most one row to spare."""
    table = {}
    for r in range(mr):
        for full in (True, False):
            best = None
            for d in (-1, 0, 1):
                for k in range(4):
                    rows = d * mr + k * ms
                    if rows < r or (d < 0 and not full) or (r == 0 and (d, k) != (0, 0)):
                        continue
                    key = (rows - r, d + k, k)
                    if best is None or key < best[0]:
                        best = (key, (d, k))
            table[r, full] = best[1]
    return table


def tile_counts(n, mr: int, ms: int):
    """(tiles of mr rows, tiles of ms rows) covering n rows (a TIR expression), per cover_table."""
    from tvm import tirx
    cover = cover_table(mr, ms)
    i64 = lambda v: tirx.const(v, "int64")  # noqa: E731
    a, r = n // mr, n % mr
    big, small = a, i64(0)
    for rem in reversed(range(1, mr)):
        (d1, k1), (d0, k0) = cover[rem, True], cover[rem, False]
        d = i64(d1) if d1 == d0 else tirx.Select(a >= 1, i64(d1), i64(d0))
        k = i64(k1) if k1 == k0 else tirx.Select(a >= 1, i64(k1), i64(k0))
        big, small = tirx.Select(r == rem, a + d, big), tirx.Select(r == rem, k, small)
    return big, small
