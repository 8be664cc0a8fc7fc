"""The cells the fast CPU kernel (cpu.py) runs: how LSTM, GRU and RNN use a unit block's four
column groups, and the update a register tile ends with.

The kernel computes, for a tile of batch rows and one unit block, four column groups of `bw` lanes,
bias + x_t @ W + h @ R, in registers; the cell says what the groups are and what to do with them.
- LSTM: the gates i, o, f, c of the block's units.
- GRU (linear_before_reset only): z, r, x_t*Wh + Wbh and Ht-1*Rh + Rbh. The last two are kept
  apart because r multiplies only the recurrent one, so W's 4th group and R's 3rd are zero
  (packing.gru_as_gates): a quarter of the multiply-adds are wasted, for the LSTM's whole machinery.
  With linear_before_reset = 0, r is needed before Ht-1*Rh can start: that GRU keeps the portable
  loop.
- RNN: four groups of units. Unit j of group g is hidden unit g*U + j (U = ceil(H/4)), so a block
  computes 4 x bw units with no wasted lane but the padding (packing.rnn_as_gates).
Invariants: the state buffer holds h in hidden-unit order (the h @ R loop reads units 0..H-1);
nothing writes a unit at or past H of y, nor a unit of another group (RNN stores are masked).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .fast_math import FastGateMath, FastLoopMath
from .packing import padded
from .recurrence import CellSpec


class KernelCell:
    """One direction's cell as the kernel sees it: `units` per column group, `math` on PrimExprs."""

    def __init__(self, spec):
        self.spec = spec
        self.kind = "LSTM" if isinstance(spec, CellSpec) else spec.kind
        if self.kind == "GRU" and not spec.linear_before_reset:
            raise ValueError("the fast CPU kernel runs GRU with linear_before_reset only")
        self.hidden = spec.hidden
        self.units = -(-spec.hidden // 4) if self.kind == "RNN" else spec.hidden
        self.math = FastGateMath(spec) if self.kind == "LSTM" else FastLoopMath(spec)

    def width(self, lanes: int) -> int:
        """Floats per batch row of the state buffers: every unit a block may store, padding included."""
        return padded(self.units, lanes) + (3 * self.units if self.kind == "RNN" else 0)


def make_finish(cell: KernelCell, lanes: int, step_of, peep):
    """The macro finish(mr, bw, acc, r0, u, t, n_t, n_b, p, lens, y, cs, hb): the update of rows r0..
    (those inside the batch) of unit block u from the column groups in acc (mr, 4*bw): group g of
    lane v at acc[r, g*bw + v]. h is double-buffered: read hb[t % 2], write hb[1 - t % 2]."""
    LANES, H, U, m = lanes, cell.hidden, cell.units, cell.math
    UB = padded(U, LANES) // LANES
    LAST = U - (UB - 1) * LANES  # real units in the last unit block
    one = tirx.const(1.0, "float32")

    def gru_h(xz, xr, xn, hn, h_prev):
        f, g = m.acts
        z, r = f(m.clip(xz)), f(m.clip(xr))
        n = g(m.clip(xn + r * hn))
        return (one - z) * n + z * h_prev

    @T.macro
    def store_y(bw, row, u, t, n_t, lens, y, hb):
        """y at the row's time index = the new h of block u (its real units only)."""
        if bw < LANES or u == UB - 1:  # the last block holds LAST real units
            for v in T.vectorized(LAST):
                y[step_of(t, m.seq_len(lens[row], n_t), n_t), row, u * LANES + v] = hb[1 - t % 2, row, u * LANES + v]
        else:
            for v in T.vectorized(LANES):
                y[step_of(t, m.seq_len(lens[row], n_t), n_t), row, u * LANES + v] = hb[1 - t % 2, row, u * LANES + v]

    @T.macro
    def keep(bw, row, u, t, y, hb):
        """Past its length a sequence keeps its state and emits zeros."""
        for v in T.vectorized(bw):
            hb[1 - t % 2, row, u * LANES + v] = hb[t % 2, row, u * LANES + v]
        if bw < LANES or u == UB - 1:
            for v in T.vectorized(LAST):
                y[t, row, u * LANES + v] = T.float32(0)
        else:
            for v in T.vectorized(LANES):
                y[t, row, u * LANES + v] = T.float32(0)

    @T.macro
    def finish_lstm(mr, bw, acc, r0, u, t, n_t, n_b, p, lens, y, cs, hb):
        for r in T.unroll(mr):
            if r0 + r < n_b:
                if t < m.seq_len(lens[r0 + r], n_t):
                    for v in T.vectorized(bw):
                        cs[r0 + r, u * LANES + v] = m.cell_c(
                            acc[r, v], acc[r, 2 * bw + v], acc[r, 3 * bw + v], peep(p, 0, u, v), peep(p, 2, u, v),
                            cs[r0 + r, u * LANES + v])
                    for v in T.vectorized(bw):
                        hb[1 - t % 2, r0 + r, u * LANES + v] = m.cell_h(
                            acc[r, bw + v], peep(p, 1, u, v), cs[r0 + r, u * LANES + v])
                    store_y(bw, r0 + r, u, t, n_t, lens, y, hb)
                else:
                    keep(bw, r0 + r, u, t, y, hb)

    @T.macro
    def finish_gru(mr, bw, acc, r0, u, t, n_t, n_b, p, lens, y, cs, hb):
        for r in T.unroll(mr):
            if r0 + r < n_b:
                if t < m.seq_len(lens[r0 + r], n_t):
                    for v in T.vectorized(bw):
                        hb[1 - t % 2, r0 + r, u * LANES + v] = gru_h(
                            acc[r, v], acc[r, bw + v], acc[r, 2 * bw + v], acc[r, 3 * bw + v],
                            hb[t % 2, r0 + r, u * LANES + v])
                    store_y(bw, r0 + r, u, t, n_t, lens, y, hb)
                else:
                    keep(bw, r0 + r, u, t, y, hb)

    def end(g):  # the first hidden unit past group g
        return tirx.min(tirx.Select(g < 3, (g + 1) * U, tirx.const(H, "int64")), tirx.const(H, "int64"))

    @T.macro
    def rnn_unit(valid, row, j, c, r, t, n_t, lens, acc, y, hb):
        """Unit j of the row from column c of acc (valid: the row's sequence is still running)."""
        if valid:
            hb[1 - t % 2, row, j] = m.acts[0](m.clip(acc[r, c]))
            y[step_of(t, m.seq_len(lens[row], n_t), n_t), row, j] = hb[1 - t % 2, row, j]
        else:  # past its length: keep the state, emit zeros
            hb[1 - t % 2, row, j] = hb[t % 2, row, j]
            y[t, row, j] = T.float32(0)

    @T.macro
    def rnn_groups(valid, bw, r, row, u, t, n_t, lens, acc, y, hb):
        # one loop body for the four groups (four copies of it took 50% longer to compile)
        for g in T.unroll(T.int64(4)):
            if g * U + u * LANES + bw <= end(g):  # the group's lanes are all real units
                for v in T.vectorized(bw):
                    rnn_unit(valid, row, g * U + u * LANES + v, g * bw + v, r, t, n_t, lens, acc, y, hb)
            else:  # the group's last units: masked, so that no store reaches another group or y's next row
                for v in T.serial(bw):
                    if g * U + u * LANES + v < end(g):
                        rnn_unit(valid, row, g * U + u * LANES + v, g * bw + v, r, t, n_t, lens, acc, y, hb)

    @T.macro
    def finish_rnn(mr, bw, acc, r0, u, t, n_t, n_b, p, lens, y, cs, hb):
        for r in T.unroll(mr):
            if r0 + r < n_b:
                if t < m.seq_len(lens[r0 + r], n_t):
                    rnn_groups(True, bw, r, r0 + r, u, t, n_t, lens, acc, y, hb)
                else:
                    rnn_groups(False, bw, r, r0 + r, u, t, n_t, lens, acc, y, hb)

    return {"LSTM": finish_lstm, "GRU": finish_gru, "RNN": finish_rnn}[cell.kind]
