"""The fast CPU path: packed weights, a register-blocked projection GEMM and a fused recurrent step.

Layout: hidden units are grouped in blocks of LANES (16 floats = one AVX-512 register); for unit
block u the four ONNX gates i, o, f, c sit next to each other, so a row of the packed weights is
[i of 16 units | o | f | c]. The last block is only as wide as its real units rounded up to 4
(`tail_width`), so H=100 computes 104 units, not 112; past the real units the weights are zero.
Padded units never feed real ones (rows of R past H are never read) and are never written out.

- `make_cpu_layer`: one PrimFunc per layer and direction. A work item (a tile of up to MR batch
  rows by one unit block) computes bias + x_t @ W + h @ R in registers and the cell update with
  the gates still there. With small weights each thread runs the whole sequence for its own batch
  rows, with no synchronisation at all; with large ones the threads split each step's unit blocks
  and meet at a barrier (h is double-buffered, so one per step). Below MR batch rows the
  projection runs first as one GEMM.
sigmoid and tanh use a rational approximation (as Eigen and ONNX Runtime's MLAS do) that
vectorizes; other activations use TVM's exact intrinsics.
"""
from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from .recurrence import CellSpec, GateMath

LANES = 16
MR = 6  # batch rows per register tile (6 x 4 gates = 24 of the 32 AVX-512 registers)
# A work item's register tile and index arrays are "global" buffers under 1024 bytes: TVM puts
# those on the stack (where LLVM keeps them in registers) and lowers every other buffer, "local"
# ones included, to a TVMBackendAllocWorkspace call, which per work item cost T50 B128 about 10%.
# So a tile of MR rows is held in two buffers: rows < RA (3 x 64 floats = 768 bytes) and the rest.
RA = 3
UNIT_MAJOR_BYTES = 256 * 1024  # projection weights above this are split between cores, not shared
# With B >= MR, a layer whose packed W and R fit one core's L2 (2 MB here) splits the batch between
# threads, each reading all the weights; a larger one splits each step's unit blocks, each thread
# keeping its part of the weights. Same-process A/B, batch split against unit split: 0.70-0.93x
# at 0.1-0.7 MB of weights, 0.975x at 1.5 MB, 1.09x at 3.1 MB, 1.07x at 6 MB.
BATCH_SPLIT_BYTES = 2 * 1024 * 1024


def padded(h: int) -> int:
    return (h + LANES - 1) // LANES * LANES


def tail_width(hidden: int) -> int:
    """Lanes of the last unit block: its real units rounded up to 4, so that its 4 gates fill
    4*width/16 whole registers (a 100-unit layer computes 100 + 4 units, not 112)."""
    last = hidden - (padded(hidden) // LANES - 1) * LANES
    return (last + 3) // 4 * 4


def packed_size(hidden: int, rows: int) -> int:
    """Floats in the packed form of a (4*hidden, rows) weight: full blocks, then the tail block."""
    ub = padded(hidden) // LANES
    return (ub - 1) * rows * 4 * LANES + rows * 4 * tail_width(hidden)


def pack_gates(w: np.ndarray, hidden: int) -> np.ndarray:
    """ONNX-ordered (4H, K) weights -> flat float32: unit block u (LANES wide, the last one
    tail_width wide: bw) is a (K, 4, bw) slab at offset u*K*4*LANES, gates in ONNX order i, o, f, c
    side by side for each row k, zero past the real units."""
    k = w.shape[1]
    ub = padded(hidden) // LANES
    tw = tail_width(hidden)
    gates = w.reshape(4, hidden, k)
    out = np.zeros(packed_size(hidden, k), np.float32)
    for u in range(ub):
        bw = LANES if u < ub - 1 else tw
        n = min(bw, hidden - u * LANES)
        slab = np.zeros((k, 4, bw), np.float32)
        slab[:, :, :n] = gates[:, u * LANES:u * LANES + n, :].transpose(2, 0, 1)
        out[u * k * 4 * LANES:u * k * 4 * LANES + k * 4 * bw] = slab.ravel()
    return out


def pack_bias(b: np.ndarray, hidden: int) -> np.ndarray:
    """(4H,) -> flat, in the packed column order (one row of pack_gates)."""
    return pack_gates(np.asarray(b, np.float32).reshape(4 * hidden, 1), hidden)


# Rational tanh approximation for float32 (Eigen's generic_fast_tanh_float coefficients).
_A = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
      -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_B = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)


def tanh_parts(x):
    """tanh(x) as (numerator, denominator) of the rational approximation; |numerator| <= denominator,
    and the denominator lies in [4.9e-3, 1], so products of a few of them stay normal floats."""
    f = lambda v: tirx.const(v, "float32")  # noqa: E731
    x = tirx.max(tirx.min(x, f(7.90531110763549805)), f(-7.90531110763549805))
    x2 = x * x
    p = f(_A[6])
    for a in (_A[5], _A[4], _A[3], _A[2], _A[1], _A[0]):
        p = p * x2 + f(a)
    q = f(_B[3])
    for b in (_B[2], _B[1], _B[0]):
        q = q * x2 + f(b)
    return x * p, q


def sigmoid_parts(x):
    """sigmoid(x) = 0.5 + 0.5 tanh(x / 2) as (numerator, denominator)."""
    half = tirx.const(0.5, "float32")
    n, q = tanh_parts(half * x)
    return half * (q + n), q


def fast_tanh(x):
    n, q = tanh_parts(x)
    return n / q


def fast_sigmoid(x):
    n, q = sigmoid_parts(x)
    return n / q


class FastGateMath(GateMath):
    """GateMath with the default activations swapped for their vectorizable approximations.

    With the default activations (sigmoid, tanh, tanh) and no input_forget, the cell update puts
    each half of the cell over one common denominator: 2 vector divisions per unit instead of 5
    (measured within noise at T50 B128 H100: the step is bound by its FMAs, not the divisions).
    """

    def __init__(self, spec: CellSpec):
        super().__init__(spec)
        fast = {"sigmoid": fast_sigmoid, "tanh": fast_tanh}
        names = tuple(a[0].lower() for a in (spec.f, spec.g, spec.h))
        self.f, self.g, self.h = (fast.get(n, act) for n, act in zip(names, (self.f, self.g, self.h)))
        self.shared_division = names == ("sigmoid", "tanh", "tanh") and not spec.input_forget

    def cell_c(self, xi, xf, xc, pi, pf, c_prev):
        if not self.shared_division:
            return super().cell_c(xi, xf, xc, pi, pf, c_prev)
        ni, qi = sigmoid_parts(self.clip(self.peephole(xi, pi, c_prev)))
        nf, qf = sigmoid_parts(self.clip(self.peephole(xf, pf, c_prev)))
        ng, qg = tanh_parts(self.clip(xc))
        # f * c + i * g = (nf/qf) c + (ni/qi)(ng/qg)
        return (nf * c_prev * (qi * qg) + ni * ng * qf) / (qf * (qi * qg))

    def cell_h(self, xo, po, c_new):
        if not self.shared_division:
            return super().cell_h(xo, po, c_new)
        no, qo = sigmoid_parts(self.clip(self.peephole(xo, po, c_new)))
        nc, qc = tanh_parts(c_new)
        return (no * nc) / (qo * qc)


def make_cpu_layer(spec: CellSpec, k_dim: int, has_state: bool = True, has_peepholes: bool = True,
                   threads: int = 1):
    """One direction of one layer, projection included:
    PrimFunc(x (T, B, K), wp (packed K rows), bias (packed), rp (packed H rows), p (3, HP),
    h0, c0 (B, H), lens (B,)) -> y (T, B, H), hn (B, H), cn (B, H); the packed forms are
    pack_gates' and pack_bias'.

    The whole sequence is one parallel launch. With B >= MR and packed weights up to
    BATCH_SPLIT_BYTES, thread i of `threads` takes batch rows [i*B/threads, (i+1)*B/threads) and
    runs every step of them alone (see share_step): no barrier, and no cache line of h or c moves
    between cores. Otherwise every thread runs the time loop, takes its share of each step's work
    items and waits at a barrier (with a launch per step instead, T32 B1 H256 took 0.266 ms against
    0.239 ms, and one streaming step 7% longer, in a same-process A/B). The step split cost T50 B128
    H100 15% over one thread's time (2.65 ms against 4.48 / 2): waiting, h crossing cores, and y's
    rows (400 bytes, not whole cache lines) written by both; the batch split takes 2.20 against 2.58.

    With B >= MR the input projection is fused into each step: a work item's register tile starts
    from bias + x_t @ W for its rows and unit block, then adds h @ R, so the T*B*4H projection is
    never written to memory and read back (it was 11 MB at T50 B128 H100, and evicted R from L2).
    A tile is MR batch rows by one unit block (in the batch split, tiles of 6 and 4 rows cover a
    share with at most one row to spare; in the step split the last tile repeats the batch's last
    row where the batch runs out; repeated rows are never written). The narrow last unit block
    (tail_width lanes: 4 for H=100, not 16) packs its 4 gates into 4*width/16 registers; see
    fused_step for how its cheaper items are placed in the step split.
    With B < MR (serving) one x_t row per step would stream all of W per step, so the projection
    runs first over all T*B rows into a scratch buffer, spread over the cores, as one GEMM.
    The padded units live only in the kernel's own state buffers; y is written unpadded.

    Work items run unit-block-major, so each block's weights are read once from L2 for all the
    tiles that use them. `threads` is the core count the code is made for (the target's num-cores):
    it sets the batch split's shares, and below MR rows each thread keeps a fixed share of R (see
    row_step). Run on more threads, the extra ones idle; on fewer, a thread takes several shares.
    Either way the results are the same.
    Without `has_state` (no initial_h/c) h0 and c0 are (1, H) placeholders and the state starts at
    zero; without sequence lengths lens is a (1,) placeholder; without `has_peepholes` p is never
    read. None of them costs a kernel launch.
    """
    H = spec.hidden
    HP = padded(H)
    UB = HP // LANES
    TW = tail_width(H)
    FULL = UB if TW == LANES else UB - 1  # unit blocks of full width; a narrower last one is the tail
    LAST = H - (UB - 1) * LANES  # real units in the last unit block
    NP = packed_size(H, 1)
    K = k_dim
    m = FastGateMath(spec)
    first_product = tirx.const(0 if has_state else 1, "int64")
    unit_major = K * NP * 4 > UNIT_MAJOR_BYTES
    batch_split = (packed_size(H, K) + packed_size(H, H)) * 4 <= BATCH_SPLIT_BYTES

    def state_dims(n_b):
        return (n_b, H) if has_state else (1, H)

    def lens_dims(n_b):
        return (n_b,) if spec.has_lens else (1,)

    def initial(buf, b, j):
        if not has_state:
            return tirx.const(0.0, "float32")
        return tirx.if_then_else(j < H, buf[b, tirx.min(j, H - 1)], tirx.const(0.0, "float32"))

    def step_of(t, length, n_t):
        return tirx.min(tirx.max(m.step_index(t, length), tirx.const(0, "int64")), n_t - 1)

    def peep(p, i, u, v):
        return p[i, u * LANES + v] if has_peepholes else None

    def n_tiles(n_b):  # batch tiles of MR rows (the last one repeats the last row as needed)
        return (n_b + MR - 1) // MR

    def tail_from(n_b):  # where the tail block's items start in a step's list: see fused_step
        return FULL * n_tiles(n_b) // 2

    # Whether unit block u is full width / step-split item w is the tail's: a Python bool where the
    # layer has only full blocks or only the tail (H <= 16), so that one branch is emitted, not two
    # (with both, the batch split's tiles took the tests' H=4 model 8.9 s to compile, not 5.6)
    def is_full(u):
        return True if FULL == UB else False if FULL == 0 else u < FULL

    def in_tail(w, n_b):
        if FULL == UB or FULL == 0:
            return FULL == 0
        return tirx.all(w >= tail_from(n_b), w < tail_from(n_b) + n_tiles(n_b))

    def lo(mr):  # rows of a register tile held in its first buffer
        return min(mr, RA)

    def hi(mr):  # and in its second
        return mr - lo(mr)

    @T.macro
    def add_x_w(n, off, bw, acc, rt, rb, u, k, x, wp):
        """acc[r] += x[rt[off+r], rb[off+r], k] * W[k] for r < n (unit block u, bw lanes)."""
        for r in T.unroll(n):
            for c in T.unroll(4 * bw // LANES):
                for v in T.vectorized(LANES):
                    acc[r, c * LANES + v] = acc[r, c * LANES + v] + x[rt[off + r], rb[off + r], k] * \
                        wp[u * K * 4 * LANES + k * 4 * bw + c * LANES + v]

    @T.macro
    def add_h_r(n, off, bw, acc, rb, u, k, t, hb, rp):
        """acc[r] += h[rb[off+r], k] * R[k] for r < n (unit block u, bw lanes)."""
        for r in T.unroll(n):
            for c in T.unroll(4 * bw // LANES):
                for v in T.vectorized(LANES):
                    acc[r, c * LANES + v] = acc[r, c * LANES + v] + hb[t % 2, rb[off + r], k] * \
                        rp[u * H * 4 * LANES + k * 4 * bw + c * LANES + v]

    @T.macro
    def x_times_w(mr, bw, acc, acc2, rt, rb, u, x, wp, bias):
        """Rows r of the register tile (acc: rows < RA, acc2: the rest) = bias + x[rt[r], rb[r]] @ W
        for unit block u (bw lanes): the projection's register tile. Both buffers' FMAs sit in
        one k loop, so each vector of W is loaded once for all rows."""
        for r in T.unroll(lo(mr)):
            for c in T.unroll(4 * bw // LANES):
                for v in T.vectorized(LANES):
                    acc[r, c * LANES + v] = bias[u * 4 * LANES + c * LANES + v]
        if mr > RA:
            for r in T.unroll(hi(mr)):
                for c in T.unroll(4 * bw // LANES):
                    for v in T.vectorized(LANES):
                        acc2[r, c * LANES + v] = bias[u * 4 * LANES + c * LANES + v]
        for k in T.serial(K):
            add_x_w(lo(mr), 0, bw, acc, rt, rb, u, k, x, wp)
            if mr > RA:
                add_x_w(hi(mr), RA, bw, acc2, rt, rb, u, k, x, wp)

    @T.macro
    def finish(mr, bw, acc, r0, u, t, n_t, n_b, p, lens, y, cs, hb):
        """The cell update of rows r0.. (those inside the batch) of unit block u from the gate
        pre-activations in acc (mr, 4*bw): gate g of unit v at acc[r, g*bw + v]."""
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
                    if bw < LANES or u == UB - 1:  # the last block holds LAST real units
                        for v in T.vectorized(LAST):
                            y[step_of(t, m.seq_len(lens[r0 + r], n_t), n_t), r0 + r, u * LANES + v] = \
                                hb[1 - t % 2, r0 + r, u * LANES + v]
                    else:
                        for v in T.vectorized(LANES):
                            y[step_of(t, m.seq_len(lens[r0 + r], n_t), n_t), r0 + r, u * LANES + v] = \
                                hb[1 - t % 2, r0 + r, u * LANES + v]
                else:
                    for v in T.vectorized(bw):
                        hb[1 - t % 2, r0 + r, u * LANES + v] = hb[t % 2, r0 + r, u * LANES + v]
                    if bw < LANES or u == UB - 1:
                        for v in T.vectorized(LAST):
                            y[t, r0 + r, u * LANES + v] = T.float32(0)
                    else:
                        for v in T.vectorized(LANES):
                            y[t, r0 + r, u * LANES + v] = T.float32(0)

    @T.macro
    def tile(mr, bw, u, r0, t, n_t, n_b, fused, x, wp, bias, xw, rp, p, lens, y, cs, hb):
        """Rows r0 .. r0+mr-1 of unit block u (bw lanes wide): gates in registers, then the cell
        update. Rows past the batch (in a block's last tile) repeat the batch's last row and are
        not written."""
        acc = T.alloc_buffer((lo(mr), 4 * bw), "float32", scope="global")  # rows < RA
        acc2 = T.alloc_buffer((max(hi(mr), 1), 4 * bw), "float32", scope="global")  # the rest
        rb = T.alloc_buffer((mr,), "int64", scope="global")  # each row's batch index
        rt = T.alloc_buffer((mr,), "int64", scope="global")  # and the time index it reads at step t
        for r in T.unroll(mr):
            rb[r] = T.min(r0 + r, n_b - 1)
            rt[r] = step_of(t, m.seq_len(lens[T.min(r0 + r, n_b - 1)], n_t), n_t)
        if fused:
            x_times_w(mr, bw, acc, acc2, rt, rb, u, x, wp, bias)
        else:  # one row (B < MR)
            for c in T.unroll(4 * bw // LANES):
                for v in T.vectorized(LANES):
                    acc[0, c * LANES + v] = xw[rt[0], rb[0], u * 4 * LANES + c * LANES + v]
        if t >= first_product:  # without an initial state, h is zero at the first step: skip h @ R
            for k in T.serial(H):
                add_h_r(lo(mr), 0, bw, acc, rb, u, k, t, hb, rp)
                if mr > RA:
                    add_h_r(hi(mr), RA, bw, acc2, rb, u, k, t, hb, rp)
        finish(lo(mr), bw, acc, r0, u, t, n_t, n_b, p, lens, y, cs, hb)
        if mr > RA:
            finish(hi(mr), bw, acc2, r0 + RA, u, t, n_t, n_b, p, lens, y, cs, hb)

    @T.macro
    def fused_step(t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb):
        """One step, B >= MR: every (batch tile, unit block), unit-block-major. The tail block's
        items cost about a quarter of the others, so they sit in the middle of the list: two
        threads, each given half the list, then get the same work."""
        for w in T.parallel((FULL + (1 if FULL < UB else 0)) * n_tiles(n_b)):
            # the item's unit block and first row, held in a local, opaque to the simplifier: as
            # expressions, the tests' bidirectional H=49 model took 18 s to compile, not 7
            it = T.alloc_buffer((2,), "int64", scope="global")
            if in_tail(w, n_b):
                it[1] = (w - tail_from(n_b)) * MR
                tile(MR, TW, UB - 1, it[1], t, n_t, n_b, True, x, wp, bias, xw, rp, p, lens, y, cs, hb)
            else:
                it[0] = T.if_then_else(FULL < UB and w >= tail_from(n_b), w - n_tiles(n_b), w)
                it[1] = it[0] % n_tiles(n_b) * MR
                it[0] = it[0] // n_tiles(n_b)
                tile(MR, LANES, it[0], it[1], t, n_t, n_b, True, x, wp, bias, xw, rp, p, lens, y, cs, hb)

    def rows_of(i, n_b):  # batch rows [lo, hi) of share i (of `threads`) in the fused path
        return i * n_b // threads, (i + 1) * n_b // threads

    def tiles_of(n):
        """(tiles of MR=6 rows, tiles of 4 rows) covering n rows with at most one row to spare
        (n = 1 and 2 excepted: one 4-row tile)."""
        assert MR == 6
        a, r = n // 6, n % 6
        two_fours = tirx.all(tirx.any(r == 1, r == 2), a >= 1)
        n6 = tirx.Select(r == 5, a + 1, tirx.Select(two_fours, a - 1, a))
        n4 = tirx.Select(tirx.any(r == 0, r == 5), tirx.const(0, "int64"),
                         tirx.Select(two_fours, tirx.const(2, "int64"), tirx.const(1, "int64")))
        return n6, n4

    @T.macro
    def share_block(bw, u, sh, t, n_t, x, wp, bias, xw, rp, p, lens, y, cs, hb):
        """Unit block u (bw lanes) of a share's tiles: sh[2] tiles of MR rows from row sh[0], then
        sh[3] of 4 rows (rows from sh[1] on repeat sh[1] - 1 and are not written)."""
        for j in T.serial(sh[2]):
            tile(MR, bw, u, sh[0] + j * MR, t, n_t, sh[1], True, x, wp, bias, xw, rp, p, lens, y, cs, hb)
        for j in T.serial(sh[3]):
            tile(4, bw, u, sh[0] + sh[2] * MR + j * 4, t, n_t, sh[1], True, x, wp, bias, xw, rp, p, lens, y, cs, hb)

    @T.macro
    def share_step(i, t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb):
        """One step of share i's batch rows (B >= MR): every unit block of every tile, unit-block-major,
        so each block's weights are read once from L2 for all the share's tiles. The rows are the
        share's alone, h included: no other thread reads or writes them, so steps need no barrier."""
        # rows [lo, hi), tiles of 6 and of 4 rows: held in a local, opaque to the simplifier (as
        # expressions at every use, the tests' bidirectional H=49 model took 74 s to compile, in
        # CompactBufferAllocation, not 10.6)
        sh = T.alloc_buffer((4,), "int64", scope="global")
        sh[0] = rows_of(i, n_b)[0]
        sh[1] = rows_of(i, n_b)[1]
        sh[2] = tiles_of(sh[1] - sh[0])[0]
        sh[3] = tiles_of(sh[1] - sh[0])[1]
        if FULL > 0:  # (a Python bool: no code at all for a layer of one narrow block)
            for u in T.serial(FULL):
                share_block(LANES, u, sh, t, n_t, x, wp, bias, xw, rp, p, lens, y, cs, hb)
        if FULL < UB:
            share_block(TW, UB - 1, sh, t, n_t, x, wp, bias, xw, rp, p, lens, y, cs, hb)

    def share(n_b):  # row_step's items per thread
        return (n_b * UB + threads - 1) // threads

    @T.macro
    def row_item(w, t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb):
        """Work item w of a row step: batch row w % n_b of unit block w // n_b."""
        if is_full(w // n_b):
            tile(1, LANES, w // n_b, w % n_b, t, n_t, n_b, False, x, wp, bias, xw, rp, p, lens, y, cs, hb)
        else:
            tile(1, TW, w // n_b, w % n_b, t, n_t, n_b, False, x, wp, bias, xw, rp, p, lens, y, cs, hb)

    @T.macro
    def row_step(t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb):
        """One step, B < MR: one row per work item, the projection read from xw. Thread i always
        takes the same contiguous share of the items (so the same unit blocks of R), walked forward
        on even steps and backward on odd ones: the blocks it read last, still in its L2, come first.
        Walked forward every step, a share as large as L2 (2 MB of R per core at H=512) is evicted
        just before it is read again, and every step streams it from L3."""
        for i in T.parallel(T.int64(threads)):
            for j in T.serial(share(n_b)):
                if i * share(n_b) + j < n_b * UB:
                    # j, or at odd steps its mirror in the share; held in a local so that the tile
                    # sees one opaque index (as an expression, simplifying its copies at every use
                    # made compiling 30% slower)
                    w = T.alloc_buffer((1,), "int64", scope="global")
                    w[0] = i * share(n_b) + T.if_then_else(t % 2 == 0, j,
                                                           T.min(share(n_b), n_b * UB - i * share(n_b)) - 1 - j)
                    row_item(w[0], t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb)

    @T.macro
    def project_block(mr, bw, u, mt, n_t, n_b, x, wp, bias, xw):
        """xw[rows mt*mr.., block u] = bias + x @ W for `mr` of the T*B rows."""
        acc = T.alloc_buffer((lo(mr), 4 * bw), "float32", scope="global")
        acc2 = T.alloc_buffer((max(hi(mr), 1), 4 * bw), "float32", scope="global")
        rt = T.alloc_buffer((mr,), "int64", scope="global")  # each row's (t, b)
        rb = T.alloc_buffer((mr,), "int64", scope="global")
        for r in T.unroll(mr):
            rt[r] = T.min(mt * mr + r, n_t * n_b - 1) // n_b
            rb[r] = T.min(mt * mr + r, n_t * n_b - 1) % n_b
        x_times_w(mr, bw, acc, acc2, rt, rb, u, x, wp, bias)
        for r in T.unroll(lo(mr)):
            if mt * mr + r < n_t * n_b:
                for c in T.unroll(4 * bw // LANES):
                    for v in T.vectorized(LANES):
                        xw[rt[r], rb[r], u * 4 * LANES + c * LANES + v] = acc[r, c * LANES + v]
        if mr > RA:
            for r in T.unroll(hi(mr)):
                if mt * mr + RA + r < n_t * n_b:
                    for c in T.unroll(4 * bw // LANES):
                        for v in T.vectorized(LANES):
                            xw[rt[RA + r], rb[RA + r], u * 4 * LANES + c * LANES + v] = acc2[r, c * LANES + v]

    @T.macro
    def project_rows(mr, n_t, n_b, x, wp, bias, xw):
        """xw[t, b] = bias + x[t, b] @ W for every row; a work item is `mr` rows x one unit block."""
        for w in T.parallel(((n_t * n_b + mr - 1) // mr) * UB):
            mt: T.let[T.int64] = w % ((n_t * n_b + mr - 1) // mr) if unit_major else w // UB
            u: T.let[T.int64] = w // ((n_t * n_b + mr - 1) // mr) if unit_major else w % UB
            if is_full(u):
                project_block(mr, LANES, u, mt, n_t, n_b, x, wp, bias, xw)
            else:
                project_block(mr, TW, u, mt, n_t, n_b, x, wp, bias, xw)

    @T.macro
    def batched(n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb):
        """B >= MR: the whole sequence, the batch split between threads or each step's unit blocks."""
        if batch_split:  # each thread runs the whole sequence for its own share of the batch rows
            for i in T.parallel(T.int64(threads)):
                for t in T.serial(n_t):
                    share_step(i, t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb)
        else:
            with T.attr(T.int32(0), "pragma_parallel_launch_point", 1):
                for t in T.serial(n_t):
                    with T.attr(T.int32(0), "pragma_parallel_barrier_when_finish", 1):
                        fused_step(t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb)

    @T.prim_func(private=True)
    def lstm_layer_cpu(var_x: T.handle, wp: T.Buffer((packed_size(H, K),), "float32"), bias: T.Buffer((NP,), "float32"),
                       rp: T.Buffer((packed_size(H, H),), "float32"), p: T.Buffer((3, HP), "float32"),
                       var_h0: T.handle, var_c0: T.handle, var_lens: T.handle,
                       var_y: T.handle, var_hn: T.handle, var_cn: T.handle):
        T.func_attr({"tirx.noalias": True})
        n_t = T.int64()
        n_b = T.int64()
        x = T.match_buffer(var_x, (n_t, n_b, K), "float32")
        # the projection's scratch: used (and sized) only below MR rows
        xw = T.alloc_buffer((T.if_then_else(n_b < MR, n_t, T.int64(1)), n_b, NP), "float32")
        h0 = T.match_buffer(var_h0, state_dims(n_b), "float32")
        c0 = T.match_buffer(var_c0, state_dims(n_b), "float32")
        lens = T.match_buffer(var_lens, lens_dims(n_b), "int32")
        y = T.match_buffer(var_y, (n_t, n_b, H), "float32")
        hn = T.match_buffer(var_hn, (n_b, H), "float32")
        cn = T.match_buffer(var_cn, (n_b, H), "float32")
        hb = T.alloc_buffer((2, n_b, HP), "float32")  # double-buffered h: read [t % 2], write the other
        cs = T.alloc_buffer((n_b, HP), "float32")  # the cell state, padded
        for b0 in T.serial(n_b):
            for j0 in T.serial(HP):
                hb[0, b0, j0] = initial(h0, b0, j0)
                cs[b0, j0] = initial(c0, b0, j0)
        if n_b >= MR:  # register tiles of several batch rows share each load of W and R
            batched(n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb)
        else:  # small batches (serving): the projection as one GEMM first, then one row per item
            # One launch for the whole sequence: each thread runs this block, takes its share of
            # every parallel loop, and meets the others at the barrier after it.
            with T.attr(T.int32(0), "pragma_parallel_launch_point", 1):
                with T.attr(T.int32(0), "pragma_parallel_barrier_when_finish", 1):
                    if n_t * n_b >= MR:
                        project_rows(MR, n_t, n_b, x, wp, bias, xw)
                    else:
                        project_rows(1, n_t, n_b, x, wp, bias, xw)
                for t in T.serial(n_t):
                    with T.attr(T.int32(0), "pragma_parallel_barrier_when_finish", 1):
                        row_step(t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb)
        for b1 in T.serial(n_b):
            for j1 in T.serial(H):
                hn[b1, j1] = hb[n_t % 2, b1, j1]
                cn[b1, j1] = cs[b1, j1]

    return lstm_layer_cpu
