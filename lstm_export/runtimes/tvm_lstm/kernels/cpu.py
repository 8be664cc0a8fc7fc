"""The fast CPU kernel: a register-blocked, fused LSTM layer for constant weights (see cpu_plan).

A work item (a tile of plan.mr batch rows by one unit block of plan.lanes units) computes
bias + x_t @ W + h @ R in registers and the cell update with the gates still there.
Measurements behind these choices: docs/cpu_kernel.md. The parts: the layer's layout
(cpu_layout), the register tiles and products (cpu_tiles), the work splits (cpu_splits), the
cells' updates (cpu_cells); this module puts them together into the layer's PrimFunc.
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T
from tvm.tirx.analysis import verify_well_formed

from .cpu_cells import KernelCell, make_finish
from .cpu_layout import LayerLayout, PassBlocks
from .cpu_plan import KernelPlan
from .cpu_splits import make_batch_split, make_block_tile, make_row_split, make_step_split
from .cpu_tiles import make_products, make_projection, make_tile


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
    layout = LayerLayout.of(KernelCell(spec), k_dim, plan, has_state, has_peepholes)
    first = pass_macros(layout, layout.passes[0])
    # a one-pass cell runs only the first pass's macros
    second = pass_macros(layout, layout.passes[-1]) if layout.two else first
    return assemble_layer(layout, first, second)


@dataclass(frozen=True)
class PassMacros:
    """The macros of one pass over the unit blocks (cpu_cells.PassLayout), its constants bound:
    a step of each work split (cpu_splits) and the row path's projection (cpu_tiles)."""

    share_step: object  # (i, t, n_t, n_b, <buffers>): the batch split, thread i's rows
    fused_step: object  # (t, n_t, n_b, <buffers>): the step split
    row_step: object  # (t, n_t, n_b, <buffers>): the row split (B < MR)
    project_rows: object  # (n_t, n_b, x, wp, bias, xw): xw = bias + x @ W, every row (B < MR)


def pass_macros(layout: LayerLayout, pb: PassBlocks) -> PassMacros:
    """Pass pb's macros: its cell update, products and tile, and the splits over that tile."""
    finish = make_finish(layout.cell, pb.layout, layout.plan.lanes, layout.step_of, layout.peep)
    products = make_products(layout, pb)
    tile = make_tile(layout, pb, products, finish)
    block_tile = make_block_tile(layout, tile)
    return PassMacros(share_step=make_batch_split(layout, pb, block_tile),
                      fused_step=make_step_split(layout, pb, block_tile),
                      row_step=make_row_split(layout, pb, tile),
                      project_rows=make_projection(layout, pb, products.x_times_w))


def assemble_layer(layout: LayerLayout, A: PassMacros, B: PassMacros):
    """The layer's PrimFunc (see make_cpu_layer) from its passes' macros: the initial state, the
    sequence on the batched path (B >= MR) or the row path, and the final state."""
    K, H, HP, MR, threads = layout.k_dim, layout.hidden, layout.width, layout.plan.mr, layout.plan.threads
    W_SIZE, B_SIZE, R_SIZE, P_WIDTH = layout.w_size, layout.b_size, layout.r_size, layout.p_width
    TWO, batch_split, rev = layout.two, layout.batch_split, layout.rev
    state_dims, lens_dims, initial = layout.state_dims, layout.lens_dims, layout.initial

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
        x = T.match_buffer(var_x, (n_t, n_b, K), "float32")  # (T, B, K)
        # the projection's scratch (T, B, B_SIZE): used (and sized) only below MR rows, else (1, B, B_SIZE)
        xw = T.alloc_buffer((T.if_then_else(n_b < MR, n_t, T.int64(1)), n_b, B_SIZE), "float32")
        h0 = T.match_buffer(var_h0, state_dims(n_b), "float32")  # (B, H), or (1, H) without a state
        c0 = T.match_buffer(var_c0, state_dims(n_b), "float32")
        lens = T.match_buffer(var_lens, lens_dims(n_b), "int32")  # (B,), or (1,) without lengths
        y = T.match_buffer(var_y, (n_t, n_b, H), "float32")  # (T, B, H)
        hn = T.match_buffer(var_hn, (n_b, H), "float32")
        cn = T.match_buffer(var_cn, (n_b, H), "float32")
        hb = T.alloc_buffer((2, n_b, HP), "float32")  # (2, B, HP) double-buffered h: read [t % 2], write the other
        cs = T.alloc_buffer((n_b, HP), "float32")  # (B, HP): the cell state, padded
        zr = T.alloc_buffer((n_b if TWO else 1, 2 * H if TWO else 1), "float32")  # (B, 2H): z | r (.) Ht-1 (two passes)
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
