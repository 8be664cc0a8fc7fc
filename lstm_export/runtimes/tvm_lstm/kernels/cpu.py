"""The fast CPU kernel: a register-blocked, fused LSTM layer for constant weights (see cpu_plan).

A work item (a tile of plan.mr batch rows by one unit block of plan.lanes units) computes
bias + x_t @ W + h @ R in registers and the cell update with the gates still there.
Measurements behind these choices: docs/cpu_kernel.md.
"""
from __future__ import annotations

from types import SimpleNamespace

from tvm import tirx
from tvm.script import tirx as T
from tvm.tirx.analysis import verify_well_formed

from .cpu_cells import KernelCell, make_finish
from .cpu_plan import KernelPlan, tile_counts
from .packing import packed_size, padded, tail_width


def make_cpu_layer(spec, k_dim: int, plan: KernelPlan, has_state: bool = True, has_peepholes: bool = True):
    """One direction of one layer, projection included: PrimFunc(x (T, B, K), wp, bias, rp (packed
    by packing.py with plan.lanes, each pass's after the other), p (3, P_WIDTH), h0, c0 (B, H), lens
    (B,), rev (an int: 1 for the reverse direction)) -> y (T, B, H), hn, cn (B, H). spec: a
    CellSpec (LSTM) or a gru_rnn_loop.LoopSpec (GRU, RNN: cn means nothing); the cell (cpu_cells)
    says what the four column groups are. spec.reverse is not read: the direction is rev, so
    both directions of a layer are one function.

    Each parallel loop is a launch of thread_pool.c's claiming pool, a step's shares its chunks.
    - B >= MR, packed W + R up to plan.batch_split_bytes (one core's L2): thread i of plan.threads
      runs every step of batch rows [i*B/threads, (i+1)*B/threads) alone (share_step), in tiles of
      MR and MS rows: no barrier, no cache line of h, c or y shared between cores.
    - B >= MR, larger weights: each step's work items (tiles of MR and MS rows x unit blocks) are
      shared out (fused_step), a launch per step (h is double-buffered).
    - B < MR (serving): the projection first, over all T*B rows, then one row per item (row_step).
    With B >= MR a tile starts from bias + x_t @ W and adds h @ R: the T*B*4H projection never goes
    to memory. A tile's spare rows repeat the last row and are never written; padded units live only
    in the state buffers. Items run unit-block-major: each block's weights are read from L2 once for
    all its tiles. On more or fewer threads than plan.threads the results are the same. Without
    has_state h0, c0 are (1, H) placeholders (state from zero), without lengths lens is (1,).
    """
    LANES, MR, MS, RA, threads = plan.lanes, plan.mr, plan.ms, plan.ra, plan.threads
    rev = tirx.Var("rev", "int64")  # the direction, a parameter (see the end)
    cell = KernelCell(spec)
    H = cell.hidden  # hidden units (h, y, rows of R)
    HP = cell.width(LANES)  # of a batch row of h and c
    K, m = k_dim, cell.math
    passes = cell.with_offsets(LANES, K)
    TWO = len(passes) == 2  # GRU without linear_before_reset: see cpu_cells.PassLayout
    W_SIZE, B_SIZE, R_SIZE = (sum(packed_size(q.units, n, LANES) for q in passes) for n in (K, 1, H))
    P_WIDTH = padded(H, LANES) if cell.kind == "LSTM" else 1  # peepholes (LSTM only)
    first_product = tirx.const(0 if has_state else 1, "int64")
    batch_split = (W_SIZE + R_SIZE) * 4 <= plan.batch_split_bytes

    def state_dims(n_b):
        return (n_b, H) if has_state else (1, H)

    def lens_dims(n_b):
        return (n_b,) if spec.has_lens else (1,)

    def initial(buf, b, j):
        if not has_state:
            return tirx.const(0.0, "float32")
        return tirx.if_then_else(j < H, buf[b, tirx.min(j, H - 1)], tirx.const(0.0, "float32"))

    def step_of(t, length, n_t):  # the time index step t handles, clamped (rows past their length)
        index = tirx.Select(rev == 0, t, length - 1 - t)  # reverse: from the sequence's own last step
        return tirx.min(tirx.max(index, tirx.const(0, "int64")), n_t - 1)

    def peep(p, i, u, v):
        return p[i, u * LANES + v] if has_peepholes else None

    def pass_macros(P):
        """The macros of one pass over the unit blocks (cpu_cells.PassLayout), its constants bound."""
        U = P.units  # per column group
        UB = padded(U, LANES) // LANES
        TW = tail_width(U, LANES)
        FULL = UB if TW == LANES else UB - 1  # unit blocks of full width; a narrower last one is the tail
        NP = packed_size(U, 1, LANES)
        WO, BO, RO = P.w_off, P.b_off, P.r_off  # its slices of wp, bias (and xw's columns), rp
        unit_major = K * NP * 4 > plan.unit_major_bytes
        finish = make_finish(cell, P, LANES, step_of, peep)

        def n_tiles(nt):  # a block's tiles in the step split: nt = (of MR rows, of MS rows), see fused_step
            return nt[0] + nt[1]

        def tail_from(nt):  # where the tail block's items start in a step's list: see fused_step
            return FULL * n_tiles(nt) // 2

        def h_at(t, b, k, hb, zr):  # what the recurrent product reads: h, or r (.) Ht-1 (GRU0B)
            return zr[b, H + k] if P.reads_zr else hb[t % 2, b, k]

        # Is block u full / item w the tail's: Python bools where all blocks are full or there is only the tail
        def is_full(u):
            return True if FULL == UB else False if FULL == 0 else u < FULL

        def in_tail(w, nt):
            if FULL == UB or FULL == 0:
                return FULL == 0
            return tirx.all(w >= tail_from(nt), w < tail_from(nt) + n_tiles(nt))

        def lo(mr):  # rows of a register tile held in its first buffer (the rest: mr - lo(mr))
            return min(mr, RA)

        def operand(from_x, r, off, k, t, x, rt, rb, hb, zr):  # row off+r's x_t[k] or h[k]
            return x[rt[off + r], rb[off + r], k] if from_x else h_at(t, rb[off + r], k, hb, zr)

        def weight(from_x, u, k, bw, c, v, wp, rp):  # vector c of W's or R's block u at row k
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

        @T.macro
        def tile(mr, bw, u, r0, t, n_t, n_b, fused, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr):
            """Rows r0 .. r0+mr-1 of unit block u (bw lanes wide): gates in registers, then the cell
            update. Rows past the batch repeat the batch's last row and are not written."""
            acc = T.alloc_buffer((lo(mr), 4 * bw), "float32", scope="global")  # rows < RA
            acc2 = T.alloc_buffer((max(mr - lo(mr), 1), 4 * bw), "float32", scope="global")  # the rest
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
                        acc[0, c * LANES + v] = xw[rt[0], rb[0], BO + u * 4 * LANES + c * LANES + v]
            if t >= first_product:  # without an initial state, h is zero at the first step: skip h @ R
                for k in T.serial(H):
                    add_products(False, lo(mr), 0, bw, acc, rt, rb, u, k, t, x, wp, hb, zr, rp)
                    if mr > RA:
                        add_products(False, mr - lo(mr), RA, bw, acc2, rt, rb, u, k, t, x, wp, hb, zr, rp)
            finish(lo(mr), bw, acc, r0, u, t, n_t, n_b, p, lens, y, cs, hb, zr)
            if mr > RA:
                finish(mr - lo(mr), bw, acc2, r0 + RA, u, t, n_t, n_b, p, lens, y, cs, hb, zr)

        def n_items(nt):  # a step's work items in the step split
            return (FULL + (1 if FULL < UB else 0)) * n_tiles(nt)

        def fshare(nt):  # and each thread's share of them
            return (n_items(nt) + threads - 1) // threads

        @T.macro
        def block_tile(bw, u, j, first, big, t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr):
            """Tile j of unit block u over rows first..n_b-1: `big` tiles of MR rows, then of MS rows."""
            if MS == MR or j < big:
                tile(MR, bw, u, first + j * MR, t, n_t, n_b, True, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)
            else:
                tile(MS, bw, u, first + big * MR + (j - big) * MS, t, n_t, n_b, True, x, wp, bias, xw, rp, p, lens, y,
                     cs, hb, zr)

        @T.macro
        def step_item(i, j, nt, t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr):
            """Item j of thread i's share of step t (walked backward at odd steps, see fused_step)."""
            if i * fshare(nt) + j < n_items(nt):
                # the item's index, in a local opaque to the simplifier (compile time)
                it = T.alloc_buffer((3,), "int64", scope="global")
                it[2] = i * fshare(nt) + T.if_then_else(
                    t % 2 == 0, j, T.min(fshare(nt), n_items(nt) - i * fshare(nt)) - 1 - j)
                if in_tail(it[2], nt):
                    block_tile(TW, UB - 1, it[2] - tail_from(nt), 0, nt[0], t, n_t, n_b, x, wp, bias, xw, rp, p, lens,
                               y, cs, hb, zr)
                else:  # it[0]: the item's place in the list of full blocks' items (the tail's taken out)
                    it[0] = T.if_then_else(FULL < UB and it[2] >= tail_from(nt), it[2] - n_tiles(nt), it[2])
                    block_tile(LANES, it[0] // n_tiles(nt), it[0] % n_tiles(nt), 0, nt[0], t, n_t, n_b, x, wp, bias, xw,
                               rp, p, lens, y, cs, hb, zr)

        @T.macro
        def fused_step(t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr):
            """One step, B >= MR: every (batch tile, unit block), unit-block-major, thread i taking the
            same contiguous share every step (so the same unit blocks of W and R), walked backward at
            odd steps: the blocks it read last, still in its L2, come first. The tail block's cheaper
            items sit in the middle of the list, so that two threads, each given half, get equal work."""
            # tiles of MR, MS rows per block in a local: as Select chains in every bound, 30x the build time
            nt = T.alloc_buffer((2,), "int64", scope="global")
            nt[0] = tile_counts(n_b, MR, MS)[0]
            nt[1] = tile_counts(n_b, MR, MS)[1]
            if threads > 1:
                for i in T.parallel(T.int64(threads)):
                    for j in T.serial(fshare(nt)):
                        step_item(i, j, nt, t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)
            else:
                for j in T.serial(fshare(nt)):
                    step_item(0, j, nt, t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)

        @T.macro
        def share_block(bw, u, sh, t, n_t, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr):
            """Unit block u (bw lanes) of a share's tiles: rows sh[0]..sh[1]-1, sh[2] + sh[3] tiles."""
            for j in T.serial(sh[2] + sh[3]):
                block_tile(bw, u, j, sh[0], sh[2], t, n_t, sh[1], x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)

        @T.macro
        def share_step(i, t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr):
            """One step of share i's batch rows (B >= MR): every unit block of every tile, unit-block-major,
            so each block's weights are read once from L2 for all the share's tiles. The rows are the
            share's alone, h included: no other thread reads or writes them, so steps need no barrier."""
            # rows [lo, hi), tiles of MR and MS rows: in a local opaque to the simplifier (compile time)
            sh = T.alloc_buffer((4,), "int64", scope="global")
            sh[0] = i * n_b // threads
            sh[1] = (i + 1) * n_b // threads
            sh[2] = tile_counts(sh[1] - sh[0], MR, MS)[0]
            sh[3] = tile_counts(sh[1] - sh[0], MR, MS)[1]
            if FULL > 0:  # (a Python bool: no code at all for a layer of one narrow block)
                for u in T.serial(FULL):
                    share_block(LANES, u, sh, t, n_t, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)
            if FULL < UB:
                share_block(TW, UB - 1, sh, t, n_t, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)

        def share(n_b):  # row_step's items per thread
            return (n_b * UB + threads - 1) // threads

        @T.macro
        def row_item(w, t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr):
            """Work item w of a row step: batch row w % n_b of unit block w // n_b."""
            if is_full(w // n_b):
                tile(1, LANES, w // n_b, w % n_b, t, n_t, n_b, False, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)
            else:
                tile(1, TW, w // n_b, w % n_b, t, n_t, n_b, False, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)

        @T.macro
        def row_step(t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr):
            """One step, B < MR: one row per work item, the projection read from xw. Thread i always
            takes the same contiguous share of the items (so the same unit blocks of R), walked forward
            on even steps and backward on odd ones: the blocks it read last, still in its L2, come first
            (walked forward, a share as large as L2 is evicted just before it is read again)."""
            for i in T.parallel(T.int64(threads)):
                for j in T.serial(share(n_b)):
                    if i * share(n_b) + j < n_b * UB:
                        # j, or at odd steps its mirror in the share: one opaque index (compile time)
                        w = T.alloc_buffer((1,), "int64", scope="global")
                        w[0] = i * share(n_b) + T.if_then_else(t % 2 == 0, j,
                                                               T.min(share(n_b), n_b * UB - i * share(n_b)) - 1 - j)
                        row_item(w[0], t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)

        @T.macro
        def project_block(mr, bw, u, mt, n_t, n_b, x, wp, bias, xw):
            """xw[rows mt*mr.., block u] = bias + x @ W for `mr` of the T*B rows."""
            acc = T.alloc_buffer((lo(mr), 4 * bw), "float32", scope="global")
            acc2 = T.alloc_buffer((max(mr - lo(mr), 1), 4 * bw), "float32", scope="global")
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

        return SimpleNamespace(share_step=share_step, fused_step=fused_step, row_step=row_step,
                               project_rows=project_rows)

    A, B = pass_macros(passes[0]), pass_macros(passes[-1])

    @T.macro
    def batched(n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr):
        """B >= MR: the whole sequence, the batch split between threads or each step's unit blocks.
        With two passes the second starts when the first is done for the rows it reads: at once in
        the batch split (a thread's rows are its own), after its launch in the step split."""
        if batch_split:  # each thread runs the whole sequence for its own share of the batch rows
            for i in T.parallel(T.int64(threads)):
                for t in T.serial(n_t):
                    A.share_step(i, t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)
                    if TWO:
                        B.share_step(i, t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)
        else:  # each step a launch of its items (thread_pool.c's claiming pool: see lstm_layer_cpu)
            for t in T.serial(n_t):
                A.fused_step(t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)
                if TWO:
                    B.fused_step(t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)

    @T.macro
    def project(n_t, n_b, x, wp, bias, xw):  # every pass's projection of every row (B < MR)
        A.project_rows(n_t, n_b, x, wp, bias, xw)
        if TWO:
            B.project_rows(n_t, n_b, x, wp, bias, xw)

    @T.prim_func(private=True, check_well_formed=False)  # rev is defined below
    def lstm_layer_cpu(var_x: T.handle, wp: T.Buffer((W_SIZE,), "float32"), bias: T.Buffer((B_SIZE,), "float32"),
                       rp: T.Buffer((R_SIZE,), "float32"), p: T.Buffer((3, P_WIDTH), "float32"), var_h0: T.handle,
                       var_c0: T.handle, var_lens: T.handle, rev_placeholder: T.int64, var_y: T.handle,
                       var_hn: T.handle, var_cn: T.handle):
        T.func_attr({"tirx.noalias": True})
        n_t = T.int64()
        n_b = T.int64()
        x = T.match_buffer(var_x, (n_t, n_b, K), "float32")
        # the projection's scratch: used (and sized) only below MR rows
        xw = T.alloc_buffer((T.if_then_else(n_b < MR, n_t, T.int64(1)), n_b, B_SIZE), "float32")
        h0 = T.match_buffer(var_h0, state_dims(n_b), "float32")
        c0 = T.match_buffer(var_c0, state_dims(n_b), "float32")
        lens = T.match_buffer(var_lens, lens_dims(n_b), "int32")
        y = T.match_buffer(var_y, (n_t, n_b, H), "float32")
        hn = T.match_buffer(var_hn, (n_b, H), "float32")
        cn = T.match_buffer(var_cn, (n_b, H), "float32")
        hb = T.alloc_buffer((2, n_b, HP), "float32")  # double-buffered h: read [t % 2], write the other
        cs = T.alloc_buffer((n_b, HP), "float32")  # the cell state, padded
        zr = T.alloc_buffer((n_b if TWO else 1, 2 * H if TWO else 1), "float32")  # z | r (.) Ht-1 (two passes)
        for b0 in T.serial(n_b):
            for j0 in T.serial(HP):
                hb[0, b0, j0] = initial(h0, b0, j0)
                cs[b0, j0] = initial(c0, b0, j0)
        if n_b >= MR:  # register tiles of several batch rows share each load of W and R
            batched(n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)
        else:  # small batches (serving): the projection as one GEMM first, then one row per item
            # A launch per parallel loop, not one launch point with a barrier per step: the claiming
            # pool (thread_pool.c) lets a running thread take the share of one whose core is taken,
            # which a barrier cannot; a launch there costs what a barrier did.
            project(n_t, n_b, x, wp, bias, xw)
            for t in T.serial(n_t):
                A.row_step(t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)
                if TWO:
                    B.row_step(t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)
        for b1 in T.serial(n_b):
            for j1 in T.serial(H):
                hn[b1, j1] = hb[n_t % 2, b1, j1]
                cn[b1, j1] = cs[b1, j1]

    f = lstm_layer_cpu  # its body reads the Var rev (through step_of): rev replaces the placeholder
    f = tirx.PrimFunc([*f.params[:8], rev, *f.params[9:]], f.body, f.ret_type, f.attrs)
    assert verify_well_formed(f)
    return f
