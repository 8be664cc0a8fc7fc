"""The fast CPU kernel's register tiles (cpu.make_cpu_layer): the products x_t @ W and h @ R of a
tile of batch rows by one unit block, the tile that adds them and runs the cell's update, and the
projection of every row for the small-batch path.

Each maker binds one pass's constants (cpu_layout.PassBlocks) into TVMScript macros. A macro's
buffers are its arguments, named as in the layer PrimFunc: x (T, B, K), wp (W_SIZE,), bias
(B_SIZE,), xw (T|1, B, B_SIZE), rp (R_SIZE,), p (3, P_WIDTH), lens (B|1,), y (T, B, H), cs (B, HP),
hb (2, B, HP), zr (B|1, 2H|1). A register tile is acc (rows < RA, 4*bw) and acc2 (the rest): group
g of lane v at [r, g*bw + v], so 4*bw floats a row.
"""
from __future__ import annotations

from types import SimpleNamespace

from tvm.script import tirx as T

from .cpu_layout import LayerLayout, PassBlocks


def make_products(lay: LayerLayout, pb: PassBlocks) -> SimpleNamespace:
    """Macros add_products (acc += x_t[k] * W[k] or h[k] * R[k], rows r < n) and x_times_w (a
    tile = bias + x @ W) for pass pb."""
    LANES, K, H, RA = lay.plan.lanes, lay.k_dim, lay.hidden, lay.plan.ra
    WO, BO, RO = pb.layout.w_off, pb.layout.b_off, pb.layout.r_off  # its slices of wp, bias (xw's columns), rp
    lo = lay.lo

    def h_at(t, b, k, hb, zr):  # what the recurrent product reads: h, or r (.) Ht-1 (GRU0B)
        return zr[b, H + k] if pb.layout.reads_zr else hb[t % 2, b, k]

    def operand(from_x, r, off, k, t, x, rt, rb, hb, zr):  # row off+r's x_t[k] or h[k]
        return x[rt[off + r], rb[off + r], k] if from_x else h_at(t, rb[off + r], k, hb, zr)

    def weight(from_x, u, k, bw, c, v, wp, rp):  # vector c of W's or R's block u at row k (packing.pack_gates)
        return wp[WO + u * K * 4 * LANES + k * 4 * bw + c * LANES + v] if from_x else \
            rp[RO + u * H * 4 * LANES + k * 4 * bw + c * LANES + v]

    @T.macro
    def add_products(from_x, n, off, bw, acc, rt, rb, u, k, t, x, wp, hb, zr, rp):
        """acc[r] += x_t[k] * W[k] (from_x) or h[k] * R[k] for rows r < n of unit block u (bw
        lanes); each vector of W or R is used by all n rows before the next is loaded (cpu_plan)."""
        if n == 1:  # (one row: x or h stays in one register; this one measured faster)
            for c in T.unroll(4 * bw // LANES):
                for v in T.vectorized(LANES):
                    acc[0, c * LANES + v] = acc[0, c * LANES + v] + operand(
                        from_x, 0, off, k, t, x, rt, rb, hb, zr) * weight(from_x, u, k, bw, c, v, wp, rp)
        else:
            for c in T.unroll(4 * bw // LANES):
                for r in T.unroll(n):
                    for v in T.vectorized(LANES):
                        acc[r, c * LANES + v] = acc[r, c * LANES + v] + operand(
                            from_x, r, off, k, t, x, rt, rb, hb, zr) * weight(from_x, u, k, bw, c, v, wp, rp)

    @T.macro
    def x_times_w(mr, bw, acc, acc2, rt, rb, u, x, wp, bias):
        """Rows r of the register tile (acc: rows < RA, acc2: the rest) = bias + x[rt[r], rb[r]] @ W
        for unit block u (bw lanes): the projection's register tile. Both buffers' FMAs sit in
        one k loop, so each vector of W is loaded once for all rows."""
        for r in T.unroll(lo(mr)):
            for c in T.unroll(4 * bw // LANES):
                for v in T.vectorized(LANES):
                    acc[r, c * LANES + v] = bias[BO + u * 4 * LANES + c * LANES + v]
        if mr > RA:
            for r in T.unroll(mr - lo(mr)):
                for c in T.unroll(4 * bw // LANES):
                    for v in T.vectorized(LANES):
                        acc2[r, c * LANES + v] = bias[BO + u * 4 * LANES + c * LANES + v]
        for k in T.serial(K):
            add_products(True, lo(mr), 0, bw, acc, rt, rb, u, k, 0, x, wp, None, None, None)
            if mr > RA:
                add_products(True, mr - lo(mr), RA, bw, acc2, rt, rb, u, k, 0, x, wp, None, None, None)

    return SimpleNamespace(add_products=add_products, x_times_w=x_times_w)


def make_tile(lay: LayerLayout, pb: PassBlocks, products: SimpleNamespace, finish):
    """The macro tile(mr, bw, u, r0, t, n_t, n_b, fused, <buffers>): rows r0 .. r0+mr-1 of unit block
    u at step t, from the products (make_products) to the cell's update (cpu_cells.make_finish)."""
    LANES, H, RA, m = lay.plan.lanes, lay.hidden, lay.plan.ra, lay.cell.math
    BO, lo, step_of, first_product = pb.layout.b_off, lay.lo, lay.step_of, lay.first_product
    add_products, x_times_w = products.add_products, products.x_times_w

    @T.macro
    def tile(mr, bw, u, r0, t, n_t, n_b, fused, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr):
        """Rows r0 .. r0+mr-1 of unit block u (bw lanes wide): gates in registers, then the cell
        update. Rows past the batch repeat the batch's last row and are not written. fused: the
        tile computes bias + x_t @ W itself; else (one row, B < MR) it reads it from xw."""
        acc = T.alloc_buffer((lo(mr), 4 * bw), "float32", scope="global")  # (min(mr, RA), 4*bw): rows < RA
        acc2 = T.alloc_buffer((max(mr - lo(mr), 1), 4 * bw), "float32", scope="global")  # (mr - RA, 4*bw): the rest
        rb = T.alloc_buffer((mr,), "int64", scope="global")  # (mr,): each row's batch index
        rt = T.alloc_buffer((mr,), "int64", scope="global")  # (mr,): and the time index it reads at step t
        for r in T.unroll(mr):
            rb[r] = T.min(r0 + r, n_b - 1)
            rt[r] = step_of(t, m.seq_len(lens[T.min(r0 + r, n_b - 1)], n_t), n_t)
        if fused:
            x_times_w(mr, bw, acc, acc2, rt, rb, u, x, wp, bias)
        else:  # one row (B < MR)
            for c in T.unroll(4 * bw // LANES):
                for v in T.vectorized(LANES):
                    acc[0, c * LANES + v] = xw[rt[0], rb[0], BO + u * 4 * LANES + c * LANES + v]
        if t >= first_product:  # without an initial state, h is zero at the first step: skip h @ R
            for k in T.serial(H):
                add_products(False, lo(mr), 0, bw, acc, rt, rb, u, k, t, x, wp, hb, zr, rp)
                if mr > RA:
                    add_products(False, mr - lo(mr), RA, bw, acc2, rt, rb, u, k, t, x, wp, hb, zr, rp)
        finish(lo(mr), bw, acc, r0, u, t, n_t, n_b, p, lens, y, cs, hb, zr)
        if mr > RA:
            finish(mr - lo(mr), bw, acc2, r0 + RA, u, t, n_t, n_b, p, lens, y, cs, hb, zr)

    return tile


def make_projection(lay: LayerLayout, pb: PassBlocks, x_times_w):
    """The macro project_rows(n_t, n_b, x, wp, bias, xw): xw[t, b] = bias + x[t, b] @ W for every
    row (B < MR: the row path reads it), in register tiles of MR rows (1 below MR rows in all)."""
    LANES, MR, RA = lay.plan.lanes, lay.plan.mr, lay.plan.ra
    BO, UB, TW, lo = pb.layout.b_off, pb.blocks, pb.tail, lay.lo
    unit_major, is_full = pb.unit_major, pb.is_full

    @T.macro
    def project_block(mr, bw, u, mt, n_t, n_b, x, wp, bias, xw):
        """xw[rows mt*mr.., block u] = bias + x @ W for `mr` of the T*B rows."""
        acc = T.alloc_buffer((lo(mr), 4 * bw), "float32", scope="global")  # (min(mr, RA), 4*bw)
        acc2 = T.alloc_buffer((max(mr - lo(mr), 1), 4 * bw), "float32", scope="global")  # (mr - RA, 4*bw)
        rt = T.alloc_buffer((mr,), "int64", scope="global")  # (mr,): each row's (t, b)
        rb = T.alloc_buffer((mr,), "int64", scope="global")  # (mr,)
        for r in T.unroll(mr):
            rt[r] = T.min(mt * mr + r, n_t * n_b - 1) // n_b
            rb[r] = T.min(mt * mr + r, n_t * n_b - 1) % n_b
        x_times_w(mr, bw, acc, acc2, rt, rb, u, x, wp, bias)
        for r in T.unroll(lo(mr)):
            if mt * mr + r < n_t * n_b:
                for c in T.unroll(4 * bw // LANES):
                    for v in T.vectorized(LANES):
                        xw[rt[r], rb[r], BO + u * 4 * LANES + c * LANES + v] = acc[r, c * LANES + v]
        if mr > RA:
            for r in T.unroll(mr - lo(mr)):
                if mt * mr + RA + r < n_t * n_b:
                    for c in T.unroll(4 * bw // LANES):
                        for v in T.vectorized(LANES):
                            xw[rt[RA + r], rb[RA + r], BO + u * 4 * LANES + c * LANES + v] = acc2[r, c * LANES + v]

    @T.macro
    def project_items(mr, n_t, n_b, x, wp, bias, xw):
        """xw[t, b] = bias + x[t, b] @ W for every row; a work item is `mr` rows x one unit block."""
        for w in T.parallel(((n_t * n_b + mr - 1) // mr) * UB):
            mt: T.let[T.int64] = w % ((n_t * n_b + mr - 1) // mr) if unit_major else w // UB
            u: T.let[T.int64] = w // ((n_t * n_b + mr - 1) // mr) if unit_major else w % UB
            if is_full(u):
                project_block(mr, LANES, u, mt, n_t, n_b, x, wp, bias, xw)
            else:
                project_block(mr, TW, u, mt, n_t, n_b, x, wp, bias, xw)

    @T.macro
    def project_rows(n_t, n_b, x, wp, bias, xw):
        if n_t * n_b >= MR:
            project_items(MR, n_t, n_b, x, wp, bias, xw)
        else:
            project_items(1, n_t, n_b, x, wp, bias, xw)

    return project_rows
