"""The cells the fast CPU kernel (cpu.py) runs: how LSTM, GRU and RNN use a unit block's four
column groups, and the update a register tile ends with.

The kernel computes, for a tile of batch rows and one unit block, four column groups of `bw` lanes,
bias + x_t @ W + h @ R, in registers; the cell says what the groups are and what to do with them.
- LSTM: the gates i, o, f, c of the block's units.
- GRU with linear_before_reset: z, r, x_t*Wh + Wbh and Ht-1*Rh + Rbh. The last two are kept
  apart because r multiplies only the recurrent one, so W's 4th group and R's 3rd are zero
  (packing.gru_as_gates): a quarter of the multiply-adds are wasted, for one pass a step.
- RNN: four groups of units. Unit j of group g is hidden unit g*U + j (U = ceil(H/4)), so a block
  computes 4 x bw units with no wasted lane but the padding (packing.rnn_as_gates).
- GRU without linear_before_reset: two passes a step (PassLayout), both grouped like the RNN's.
Invariants: the state buffer holds h in hidden-unit order (the h @ R loop reads units 0..H-1);
nothing writes a unit at or past H of y, nor a unit of another group (RNN stores are masked).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from .fast_math import FastGateMath, FastLoopMath
from .packing import packed_size, padded
from .recurrence import CellSpec


@dataclass(frozen=True)
class PassLayout:
    """One pass of a step over the unit blocks: a GEMM tile per (rows, block), then its update.
    Every cell has one pass, but GRU without linear_before_reset: r (.) Ht-1 must be complete
    before its product with Rh can start, so pass "GRU0A" computes z and r (.) Ht-1 into the
    scratch zr (n_b, 2H), and pass "GRU0B" the new h from x*Wh + (r (.) Ht-1)*Rh."""

    kind: str  # "LSTM", "GRU", "RNN", "GRU0A", "GRU0B"
    units: int  # per column group
    n_units: int  # units the pass computes (GRU0A: z then r, 2H)
    grouped: bool  # the four groups are runs of units (RNN-style), not four gates of the same units
    reads_zr: bool  # its recurrent product reads r (.) Ht-1 from zr instead of h
    w_off: int = 0  # where its packed W, bias, R and projection columns start in the layer's buffers
    b_off: int = 0
    r_off: int = 0


class KernelCell:
    """One direction's cell as the kernel sees it: its passes, and `math` on PrimExprs."""

    def __init__(self, spec):
        self.spec = spec
        self.kind = "LSTM" if isinstance(spec, CellSpec) else spec.kind
        H = self.hidden = spec.hidden
        self.math = FastGateMath(spec) if self.kind == "LSTM" else FastLoopMath(spec)
        quarter = -(-H // 4)
        if self.kind in ("LSTM", "GRU") and (self.kind == "LSTM" or spec.linear_before_reset):
            self.passes = [PassLayout(self.kind, H, H, False, False)]
        elif self.kind == "RNN":
            self.passes = [PassLayout("RNN", quarter, H, True, False)]
        else:
            self.passes = [PassLayout("GRU0A", -(-2 * H // 4), 2 * H, True, False),
                           PassLayout("GRU0B", quarter, H, True, True)]

    def with_offsets(self, lanes: int, k_dim: int) -> list[PassLayout]:
        """The passes with their offsets into the layer's concatenated packed buffers."""
        out, w, b, r = [], 0, 0, 0
        for p in self.passes:
            out.append(dataclasses.replace(p, w_off=w, b_off=b, r_off=r))
            w += packed_size(p.units, k_dim, lanes)
            b += packed_size(p.units, 1, lanes)
            r += packed_size(p.units, self.hidden, lanes)
        return out

    def width(self, lanes: int) -> int:
        """Floats per batch row of the state buffers: every unit a block may store, padding included."""
        last = self.passes[-1]
        return padded(last.units, lanes) + (3 * last.units if last.grouped else 0)


def make_finish(cell: KernelCell, layout: PassLayout, lanes: int, step_of, peep):
    """The macro finish(mr, bw, acc, r0, u, t, n_t, n_b, p, lens, y, cs, hb, zr): the update of rows
    r0.. (those inside the batch) of unit block u from the column groups in acc (mr, 4*bw): group g
    of lane v at acc[r, g*bw + v]. h is double-buffered: read hb[t % 2], write hb[1 - t % 2].
    step_of(t, length, n_t): the time index of step t; peep(p, i, u, v): peephole i or None."""
    make = _finish_grouped if layout.grouped else _finish_gates
    return make(cell, layout, lanes, step_of, peep)


def _finish_gates(cell: KernelCell, layout: PassLayout, lanes: int, step_of, peep):
    """finish for the cells whose four groups are gates of the same units (LSTM, GRU with
    linear_before_reset): c then h (LSTM) or h (GRU) per lane, y from h."""
    LANES, U, m = lanes, layout.units, cell.math
    UB = padded(U, LANES) // LANES
    LAST = U - (UB - 1) * LANES  # real units in the last unit block
    one = tirx.const(1.0, "float32")

    def gru_h(xz, xr, xn, hn, h_prev):
        f, g = m.acts
        # z written twice, not bound once: each call binds fresh variables inside its activation
        # (TIR binds a variable once), and a Let bound around z made tirx.CommonSubexprElim hoist an
        # index product past its definition (LLVM: "Instruction does not dominate all uses", the
        # bidirectional OCR-head GRU). LLVM merges the two copies: run time unchanged.
        z = lambda: f(m.clip(xz))  # noqa: E731
        n = g(m.clip(xn + f(m.clip(xr)) * hn))
        return (one - z()) * n + z() * h_prev

    # One macro, no nested ones: each macro call is parsed again at every call site, and the
    # kernel calls finish from every tile variant (nested store/keep macros made building an LSTM
    # layer 35% slower: 2.5 s against 1.85 s).
    @T.macro
    def finish_gates(mr, bw, acc, r0, u, t, n_t, n_b, p, lens, y, cs, hb, zr):
        for r in T.unroll(mr):
            if r0 + r < n_b:
                if t < m.seq_len(lens[r0 + r], n_t):
                    if layout.kind == "LSTM":  # c first; h from the stored new c (GateMath.cell_h)
                        for v in T.vectorized(bw):
                            cs[r0 + r, u * LANES + v] = m.cell_c(
                                acc[r, v], acc[r, 2 * bw + v], acc[r, 3 * bw + v], peep(p, 0, u, v),
                                peep(p, 2, u, v), cs[r0 + r, u * LANES + v])
                        for v in T.vectorized(bw):
                            hb[1 - t % 2, r0 + r, u * LANES + v] = m.cell_h(
                                acc[r, bw + v], peep(p, 1, u, v), cs[r0 + r, u * LANES + v])
                    else:
                        for v in T.vectorized(bw):
                            hb[1 - t % 2, r0 + r, u * LANES + v] = gru_h(
                                acc[r, v], acc[r, bw + v], acc[r, 2 * bw + v], acc[r, 3 * bw + v],
                                hb[t % 2, r0 + r, u * LANES + v])
                    if bw < LANES or u == UB - 1:  # the last block holds LAST real units
                        for v in T.vectorized(LAST):
                            y[step_of(t, m.seq_len(lens[r0 + r], n_t), n_t), r0 + r, u * LANES + v] = \
                                hb[1 - t % 2, r0 + r, u * LANES + v]
                    else:
                        for v in T.vectorized(LANES):
                            y[step_of(t, m.seq_len(lens[r0 + r], n_t), n_t), r0 + r, u * LANES + v] = \
                                hb[1 - t % 2, r0 + r, u * LANES + v]
                else:  # past its length a sequence keeps its state and emits zeros
                    for v in T.vectorized(bw):
                        hb[1 - t % 2, r0 + r, u * LANES + v] = hb[t % 2, r0 + r, u * LANES + v]
                    if bw < LANES or u == UB - 1:
                        for v in T.vectorized(LAST):
                            y[t, r0 + r, u * LANES + v] = T.float32(0)
                    else:
                        for v in T.vectorized(LANES):
                            y[t, r0 + r, u * LANES + v] = T.float32(0)

    return finish_gates


def _finish_grouped(cell: KernelCell, layout: PassLayout, lanes: int, step_of, peep):
    """finish for the grouped passes (RNN, GRU0A, GRU0B): unit j of group g is unit g*U + j of
    the pass; GRU0A stores z | r (.) Ht-1 into zr, the others h and y."""
    LANES, H, U, m = lanes, cell.hidden, layout.units, cell.math
    N = layout.n_units  # units past N are padding, never stored
    one = tirx.const(1.0, "float32")

    def end(g):  # the first unit past group g
        return tirx.min(tirx.Select(g < 3, (g + 1) * U, tirx.const(N, "int64")), tirx.const(N, "int64"))

    def new_h(j, a, t, row, hb, zr):
        """The new h of unit j from its pre-activation a (RNN; GRU0B: a = x*Wh + (r (.) Ht-1)*Rh + b)."""
        if layout.kind == "RNN":
            return m.acts[0](m.clip(a))
        z, h_prev = zr[row, j], hb[t % 2, row, j]
        n = m.acts[1](m.clip(a))
        return (one - z) * n + z * h_prev

    def z_or_rh(j, a, t, row, hb):
        """GRU0A: z (units < H) or r (.) Ht-1 (units H..2H-1) from the pre-activation a."""
        return tirx.Select(j < H, m.acts[0](m.clip(a)),
                           m.acts[0](m.clip(a)) * hb[t % 2, row, tirx.max(j - H, tirx.const(0, "int64"))])

    def h_or_kept(valid, j, a, t, row, hb, zr):  # past its length a sequence keeps its state
        return tirx.Select(valid, new_h(j, a, t, row, hb, zr), hb[t % 2, row, j])

    def y_step(valid, t, n_t, lens, row):  # where y gets this step: zeros at t past the length
        return tirx.Select(valid, step_of(t, m.seq_len(lens[row], n_t), n_t), t)

    # Groups of units (RNN, GRU0A, GRU0B): one loop body for the four groups (four copies of it took
    # 50% longer to compile), valid and finished rows in one body by selects, and no nested macro
    # (each is parsed again at every call site: a GRU0 layer took 8.8 s to build with them).
    @T.macro
    def finish_grouped(mr, bw, acc, r0, u, t, n_t, n_b, p, lens, y, cs, hb, zr):
        for r in T.unroll(mr):
            if r0 + r < n_b:
                for g in T.unroll(T.int64(4)):
                    if g * U + u * LANES + bw <= end(g):  # the group's lanes are all real units
                        for v in T.vectorized(bw):
                            if layout.kind == "GRU0A":  # (a finished row's values are never read)
                                zr[r0 + r, g * U + u * LANES + v] = z_or_rh(g * U + u * LANES + v, acc[r, g * bw + v],
                                                                             t, r0 + r, hb)
                            else:
                                hb[1 - t % 2, r0 + r, g * U + u * LANES + v] = h_or_kept(
                                    t < m.seq_len(lens[r0 + r], n_t), g * U + u * LANES + v, acc[r, g * bw + v], t,
                                    r0 + r, hb, zr)
                                y[y_step(t < m.seq_len(lens[r0 + r], n_t), t, n_t, lens, r0 + r), r0 + r,
                                  g * U + u * LANES + v] = tirx.Select(
                                    t < m.seq_len(lens[r0 + r], n_t), hb[1 - t % 2, r0 + r, g * U + u * LANES + v],
                                    T.float32(0))
                    else:  # the group's last units: masked, so that no store reaches another group or y's next row
                        for v in T.serial(bw):
                            if g * U + u * LANES + v < end(g):
                                if layout.kind == "GRU0A":
                                    zr[r0 + r, g * U + u * LANES + v] = z_or_rh(
                                        g * U + u * LANES + v, acc[r, g * bw + v], t, r0 + r, hb)
                                else:
                                    hb[1 - t % 2, r0 + r, g * U + u * LANES + v] = h_or_kept(
                                        t < m.seq_len(lens[r0 + r], n_t), g * U + u * LANES + v, acc[r, g * bw + v],
                                        t, r0 + r, hb, zr)
                                    y[y_step(t < m.seq_len(lens[r0 + r], n_t), t, n_t, lens, r0 + r), r0 + r,
                                      g * U + u * LANES + v] = tirx.Select(
                                        t < m.seq_len(lens[r0 + r], n_t), hb[1 - t % 2, r0 + r, g * U + u * LANES + v],
                                        T.float32(0))

    return finish_grouped
