"""How the fast CPU kernel (cpu.make_cpu_layer) shares a step's work between threads: the three
work splits, each a macro over one pass's tiles (cpu_tiles.make_tile, passed in as `tile`).

- batch split (share_step): thread i owns batch rows [i*B/threads, (i+1)*B/threads) for the whole
  sequence, in tiles of MR and MS rows (cpu_plan.tile_counts), every unit block of each.
- step split (fused_step): each step's items (a tile of MR or MS rows x one unit block) are cut
  into `threads` contiguous shares, unit-block-major; a launch per step.
- row split (row_step, B < MR): one batch row x one unit block per item, `threads` shares.
Invariant (each split's test checks it): every (batch row < B, unit < U) of the pass is computed
exactly once a step, whatever the number of threads that run the launches.
Buffers are the macros' arguments, as in cpu_tiles: x, wp, bias, xw, rp, p, lens, y, cs, hb, zr.
"""
from __future__ import annotations

from tvm.script import tirx as T

from .cpu_layout import LayerLayout, PassBlocks
from .cpu_plan import tile_counts


def make_block_tile(lay: LayerLayout, tile):
    """The macro block_tile(bw, u, j, first, big, t, n_t, n_b, <buffers>): tile j of unit block u over
    rows first..n_b-1, where tiles 0..big-1 have MR rows and the rest MS rows."""
    MR, MS = lay.plan.mr, lay.plan.ms

    @T.macro
    def block_tile(bw, u, j, first, big, t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr):
        """Tile j of unit block u over rows first..n_b-1: `big` tiles of MR rows, then of MS rows."""
        if MS == MR or j < big:
            tile(MR, bw, u, first + j * MR, t, n_t, n_b, True, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr)
        else:
            tile(MS, bw, u, first + big * MR + (j - big) * MS, t, n_t, n_b, True, x, wp, bias, xw, rp, p, lens, y,
                 cs, hb, zr)

    return block_tile


def make_step_split(lay: LayerLayout, pb: PassBlocks, block_tile):
    """The macro fused_step(t, n_t, n_b, <buffers>): one step of pass pb, B >= MR, its items shared
    out between threads (the step split)."""
    LANES, MR, MS, threads = lay.plan.lanes, lay.plan.mr, lay.plan.ms, lay.plan.threads
    UB, TW, FULL = pb.blocks, pb.tail, pb.full
    n_tiles, tail_from, n_items, in_tail = pb.n_tiles, pb.tail_from, pb.n_items, pb.in_tail

    def fshare(nt):  # each thread's share of a step's items
        return pb.step_share(nt, threads)

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

    return fused_step


def make_batch_split(lay: LayerLayout, pb: PassBlocks, block_tile):
    """The macro share_step(i, t, n_t, n_b, <buffers>): step t of thread i's own batch rows, B >= MR
    (the batch split)."""
    LANES, MR, MS, threads = lay.plan.lanes, lay.plan.mr, lay.plan.ms, lay.plan.threads
    UB, TW, FULL = pb.blocks, pb.tail, pb.full

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

    return share_step


def make_row_split(lay: LayerLayout, pb: PassBlocks, tile):
    """The macro row_step(t, n_t, n_b, <buffers>): one step of pass pb, B < MR, one batch row x one
    unit block per item (the row split); the projection comes from xw (cpu_tiles.make_projection)."""
    LANES, threads = lay.plan.lanes, lay.plan.threads
    UB, TW, is_full = pb.blocks, pb.tail, pb.is_full

    def share(n_b):  # each thread's items
        return pb.row_share(n_b, threads)

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

    return row_step
