"""The fast CPU kernel's layout of one layer direction (cpu.make_cpu_layer): the sizes of its packed
buffers, each pass's unit blocks, and the index expressions its macros share.

Plain numbers computed once per layer from the cell (cpu_cells), k_dim and the plan (cpu_plan); the
macros (cpu_tiles, cpu_splits) read them as constants, so a layout decides the kernel's code.
Invariants: the packed W, bias and R of the passes sit one after the other in that order (the
offsets of cpu_cells.KernelCell.with_offsets), each laid out by packing.pack_gates; unit block u
of a pass covers its units u*lanes .. u*lanes + bw - 1, where bw = lanes but for the last block
(`tail` lanes, packing.tail_width).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tvm import tirx

from .cpu_cells import KernelCell, PassLayout
from .cpu_plan import KernelPlan
from .packing import packed_size, padded, tail_width


@dataclass(frozen=True)
class PassBlocks:
    """One pass (cpu_cells.PassLayout) cut into unit blocks of `lanes` units, and how its work items
    are numbered. The item helpers take TIR expressions (or ints) and build TIR expressions."""

    layout: PassLayout
    lanes: int
    blocks: int  # UB: unit blocks per column group, the last one maybe narrower
    tail: int  # TW: lanes of the last block (== lanes when every block is full)
    full: int  # FULL: blocks of full width; FULL < UB: the last block is a narrower tail
    unit_major: bool  # the projection's items run block-major: each core reads its own blocks of W

    @classmethod
    def of(cls, layout: PassLayout, lanes: int, k_dim: int, unit_major_bytes: int) -> PassBlocks:
        ub = padded(layout.units, lanes) // lanes
        tw = tail_width(layout.units, lanes)
        # a block's packed W (K rows of 4 groups) above unit_major_bytes: split W between cores
        unit_major = k_dim * packed_size(layout.units, 1, lanes) * 4 > unit_major_bytes
        return cls(layout, lanes, ub, tw, ub if tw == lanes else ub - 1, unit_major)

    def n_tiles(self, nt):
        """A block's tiles in the step split: nt = (tiles of MR rows, of MS rows), see fused_step."""
        return nt[0] + nt[1]

    def tail_from(self, nt):
        """Where the tail block's items start in a step's list: its middle (see fused_step)."""
        return self.full * self.n_tiles(nt) // 2

    def n_items(self, nt):
        """A step's work items in the step split: every tile of every block."""
        return (self.full + (1 if self.full < self.blocks else 0)) * self.n_tiles(nt)

    def step_share(self, nt, threads: int):
        """Each thread's share of a step's items in the step split (the last one's may be short)."""
        return (self.n_items(nt) + threads - 1) // threads

    def row_share(self, n_b, threads: int):
        """Each thread's share of a row step's n_b * UB items (one batch row x one block each)."""
        return (n_b * self.blocks + threads - 1) // threads

    # Python bools where every block is full or there is only the tail: no code for the other case
    def is_full(self, u):
        """Whether unit block u is full width."""
        return True if self.full == self.blocks else False if self.full == 0 else u < self.full

    def in_tail(self, w, nt):
        """Whether item w of the step split's list is one of the tail block's."""
        if self.full == self.blocks or self.full == 0:
            return self.full == 0
        return tirx.all(w >= self.tail_from(nt), w < self.tail_from(nt) + self.n_tiles(nt))


@dataclass(frozen=True)
class LayerLayout:
    """One direction of one layer as the kernel lays it out: buffer sizes, passes and the plan."""

    cell: KernelCell
    plan: KernelPlan
    k_dim: int  # K: features of x
    passes: tuple[PassBlocks, ...]  # one, or two (GRU without linear_before_reset: cpu_cells.PassLayout)
    w_size: int  # floats of the packed W of all passes, (K rows)
    b_size: int  # of the packed bias (one row): also the projection scratch xw's last dim
    r_size: int  # of the packed R (H rows)
    p_width: int  # peepholes' row width (3, P_WIDTH): padded H for LSTM, 1 (unused) otherwise
    batch_split: bool  # packed W + R fit one core's L2: each thread runs its own batch rows
    has_state: bool  # h0, c0 given; else (1, H) placeholders and the state starts at zero
    has_peepholes: bool
    # the direction: a scalar parameter of the PrimFunc (1: reverse), so both directions are one function
    rev: tirx.Var = field(default_factory=lambda: tirx.Var("rev", "int64"), compare=False, repr=False)

    @classmethod
    def of(cls, cell: KernelCell, k_dim: int, plan: KernelPlan, has_state: bool = True,
           has_peepholes: bool = True) -> LayerLayout:
        lanes = plan.lanes
        layouts = cell.with_offsets(lanes, k_dim)
        w_size, b_size, r_size = (sum(packed_size(q.units, n, lanes) for q in layouts) for n in (k_dim, 1, cell.hidden))
        passes = tuple(PassBlocks.of(q, lanes, k_dim, plan.unit_major_bytes) for q in layouts)
        return cls(cell, plan, k_dim, passes, w_size, b_size, r_size,
                   padded(cell.hidden, lanes) if cell.kind == "LSTM" else 1,
                   (w_size + r_size) * 4 <= plan.batch_split_bytes, has_state, has_peepholes)

    @property
    def hidden(self) -> int:
        return self.cell.hidden

    @property
    def width(self) -> int:
        """HP: floats per batch row of the state buffers h and c, padding included."""
        return self.cell.width(self.plan.lanes)

    @property
    def two(self) -> bool:
        """Two passes a step (GRU without linear_before_reset), the second reading zr."""
        return len(self.passes) == 2

    @property
    def first_product(self):
        """The first step with an h @ R product: without an initial state h is zero at step 0."""
        return tirx.const(0 if self.has_state else 1, "int64")

    def lo(self, mr: int) -> int:
        """Rows of a register tile of mr rows held in its first buffer (the rest: mr - lo(mr))."""
        return min(mr, self.plan.ra)

    def state_dims(self, n_b):
        return (n_b, self.hidden) if self.has_state else (1, self.hidden)

    def lens_dims(self, n_b):
        return (n_b,) if self.cell.spec.has_lens else (1,)

    def initial(self, buf, b, j):
        """Unit j of row b of the initial h or c: zero without a state and in the padding (j >= H)."""
        if not self.has_state:
            return tirx.const(0.0, "float32")
        return tirx.if_then_else(j < self.hidden, buf[b, tirx.min(j, self.hidden - 1)], tirx.const(0.0, "float32"))

    def step_of(self, t, length, n_t):
        """The time index step t handles, clamped (rows past their length), from rev."""
        index = tirx.Select(self.rev == 0, t, length - 1 - t)  # reverse: from the sequence's own last step
        return tirx.min(tirx.max(index, tirx.const(0, "int64")), n_t - 1)

    def peep(self, p, i, u, v):
        """Peephole i (0: i, 1: o, 2: f) of lane v of unit block u, or None without peepholes."""
        return p[i, u * self.plan.lanes + v] if self.has_peepholes else None
