"""The fast CPU kernel's parts, each on its own: the layer layout (cpu_layout), the tile and product
macros (cpu_tiles) against numpy, the work splits (cpu_splits) covering every (row, unit) once, and
the assembled layer (cpu.make_cpu_layer) against torch.nn.LSTM in float64."""
import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed")
pytestmark = pytest.mark.tvm

import tvm  # noqa: E402
from tvm import tirx  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from lstm_export.runtimes.tvm_lstm.kernels.cpu_cells import KernelCell  # noqa: E402
from lstm_export.runtimes.tvm_lstm.kernels.cpu_layout import LayerLayout  # noqa: E402
from lstm_export.runtimes.tvm_lstm.kernels.cpu_plan import KernelPlan  # noqa: E402
from lstm_export.runtimes.tvm_lstm.kernels.gru_rnn_loop import LoopSpec  # noqa: E402
from lstm_export.runtimes.tvm_lstm.kernels.packing import pack_bias, pack_gates  # noqa: E402
from lstm_export.runtimes.tvm_lstm.kernels.recurrence import CellSpec  # noqa: E402

SIG, TANH = ("Sigmoid", None, None), ("Tanh", None, None)
TARGET = "llvm"  # the portable build: these tests check indexing, not the ISA


def plan(lanes=8, mr=3, ms=2, ra=2, threads=3, batch_split_bytes=0, unit_major_bytes=0) -> KernelPlan:
    """A small plan: tiles of 3 and 2 rows with a second buffer (ra=2 < mr), 3 shares on 2 cores."""
    return KernelPlan(lanes=lanes, mr=mr, ms=ms, ra=ra, threads=threads, batch_split_bytes=batch_split_bytes,
                      unit_major_bytes=unit_major_bytes, isa="avx2")


def layout(spec, k_dim, p, **kw) -> LayerLayout:
    return LayerLayout.of(KernelCell(spec), k_dim, p, **kw)


def with_rev(f, lay: LayerLayout, index: int):
    """f with its int64 placeholder parameter `index` replaced by the layout's direction Var."""
    params = [*f.params[:index], lay.rev, *f.params[index + 1:]]
    return tirx.PrimFunc(params, f.body, f.ret_type, f.attrs).with_attr("global_symbol", "main")


def run(f, *arrays):
    """Builds f for llvm and calls it on numpy arrays (ints pass as scalars); the arrays, updated."""
    lib = tvm.compile(tvm.IRModule({"main": f}), target=TARGET)
    args = [a if isinstance(a, int) else tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*args)
    return [a.numpy() if not isinstance(a, int) else a for a in args]


# --- the layout ------------------------------------------------------------------------------------

def test_layout_of_an_lstm_layer():
    """H=100 at 8 lanes: 12 full blocks and a 4-unit tail (granule 2: 4 lanes); sizes computed by hand."""
    lay = layout(CellSpec(100, SIG, TANH, TANH), 20, plan(batch_split_bytes=(12 * 32 + 16) * 120 * 4))
    (pb,) = lay.passes
    assert (pb.blocks, pb.tail, pb.full) == (13, 4, 12)
    # W: 12 blocks of (K=20 rows x 4 gates x 8 lanes) + the tail's 20 x 4 x 4
    assert (lay.w_size, lay.b_size, lay.r_size) == (12 * 20 * 32 + 20 * 16, 12 * 32 + 16, 100 * (12 * 32 + 16))
    assert (lay.width, lay.p_width, lay.two) == (104, 104, False)
    assert lay.batch_split  # packed W + R exactly at the threshold: still one core's L2
    assert not layout(CellSpec(100, SIG, TANH, TANH), 20, plan(batch_split_bytes=(12 * 32 + 16) * 120 * 4 - 1)
                      ).batch_split
    assert pb.unit_major and not layout(CellSpec(100, SIG, TANH, TANH), 20, plan(unit_major_bytes=1 << 20)
                                        ).passes[0].unit_major
    nt = (3, 1)  # 3 tiles of MR rows and one of MS rows per block
    assert (pb.n_tiles(nt), pb.n_items(nt), pb.tail_from(nt), pb.step_share(nt, 3)) == (4, 52, 24, 18)
    assert (pb.is_full(11), pb.is_full(12), pb.row_share(5, 3)) == (True, False, 22)


def test_layout_of_a_two_pass_gru():
    """GRU without linear_before_reset: z|r over ceil(2*33/4) = 17 grouped units, then ceil(33/4) = 9;
    the second pass's W, bias and R start where the first's end."""
    lay = layout(LoopSpec("GRU", 33, (SIG, TANH)), 10, plan(lanes=16), has_peepholes=False)
    a, b = lay.passes
    assert (a.layout.units, a.blocks, a.tail, a.full) == (17, 2, 4, 1)  # a full block and a 1-unit tail
    assert (b.layout.units, b.blocks, b.tail, b.full) == (9, 1, 12, 0)  # a tail only
    assert (b.layout.w_off, b.layout.b_off, b.layout.r_off) == (10 * 64 + 10 * 16, 64 + 16, 33 * (64 + 16))
    assert (lay.w_size, lay.b_size, lay.r_size) == (800 + 10 * 48, 80 + 48, 33 * 128)
    assert lay.two and lay.p_width == 1 and lay.width == 16 + 3 * 9  # h as 4 groups of 9 in a 16-lane block
    assert b.is_full(0) is False and b.in_tail(0, (1, 0)) is True  # a tail only: Python bools, no code


# --- the work splits -------------------------------------------------------------------------------

def counting_tile(lanes):
    """A tile that adds 1 to y[t, row, unit] for each (row < n_b, unit) it covers, instead of computing."""
    @T.macro
    def tile(mr, bw, u, r0, t, n_t, n_b, fused, x, wp, bias, xw, rp, p, lens, y, cs, hb, zr):
        for r in T.serial(mr):
            if r0 + r < n_b:
                for v in T.serial(bw):
                    y[t, r0 + r, u * lanes + v] = y[t, r0 + r, u * lanes + v] + T.float32(1)
    return tile


def split_counts(split, lay, n_t, n_b):
    """y (T, B, UB*lanes): how often each (step, row, unit) was covered by the split's tiles."""
    from lstm_export.runtimes.tvm_lstm.kernels.cpu_splits import (
        make_batch_split,
        make_block_tile,
        make_row_split,
        make_step_split,
    )
    pb, lanes, threads = lay.passes[0], lay.plan.lanes, lay.plan.threads
    tile = counting_tile(lanes)
    step = {"batch": make_batch_split, "step": make_step_split}.get(split)
    step = step(lay, pb, make_block_tile(lay, tile)) if step else make_row_split(lay, pb, tile)
    width = pb.blocks * lanes

    @T.macro
    def run_split(t, n_t, n_b, y):
        if split == "batch":
            for i in T.parallel(T.int64(threads)):
                step(i, t, n_t, n_b, None, None, None, None, None, None, None, y, None, None, None)
        else:
            step(t, n_t, n_b, None, None, None, None, None, None, None, y, None, None, None)

    @T.prim_func(private=True)
    def f(var_y: T.handle):
        n_t = T.int64()
        n_b = T.int64()
        y = T.match_buffer(var_y, (n_t, n_b, width), "float32")  # (T, B, UB*lanes)
        for t in T.serial(n_t):
            run_split(t, n_t, n_b, y)

    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=TARGET)
    return {b: _call(lib, n_t, b, width) for b in n_b}


def _call(lib, n_t, n_b, width):
    y = tvm.runtime.tensor(np.zeros((n_t, n_b, width), np.float32))
    lib["main"](y)
    return y.numpy()


@pytest.mark.parametrize("split,hidden,threads", [
    ("batch", 20, 3), ("step", 20, 3), ("step", 16, 1), ("step", 3, 2), ("row", 20, 3), ("row", 3, 2)])
def test_split_covers_every_row_and_unit_once(split, hidden, threads):
    """Each split, on shares that do not divide the batch, computes every batch row of every unit of
    the blocks exactly once a step (odd steps walk backward): H=20 at 8 lanes is two full blocks and
    a 4-lane tail, 16 full blocks only, 3 a tail only."""
    lay = layout(CellSpec(hidden, SIG, TANH, TANH), 4, plan(threads=threads))
    granule = lay.plan.lanes // 4
    covered = -(-hidden // granule) * granule  # full blocks and the tail rounded up to whole registers
    batches = (1, 2, 5) if split == "row" else (3, 4, 5, 7, 11)  # the row split runs below MR rows
    for n_b, y in split_counts(split, lay, 3, batches).items():
        assert (y[..., :covered] == 1).all(), f"B={n_b}: a (row, unit) computed {y[..., :covered].min()} or " \
                                              f"{y[..., :covered].max()} times"
        assert (y[..., covered:] == 0).all(), f"B={n_b}: a store past the last block's lanes"


# --- the tile and product macros -------------------------------------------------------------------

def gate_inputs(seed, n_b, k, hidden):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, n_b, k)).astype(np.float32)  # (1, B, K)
    h = rng.standard_normal((n_b, hidden)).astype(np.float32)  # (B, H)
    w, r = (rng.standard_normal((4 * hidden, n)).astype(np.float32) for n in (k, hidden))  # (4H, K), (4H, H)
    bias = rng.standard_normal(4 * hidden).astype(np.float32)  # (4H,)
    return x, h, w, r, bias


def packed_columns(gates, hidden, lanes, blocks):
    """(B, 4H) ONNX-ordered gates -> (B, UB*4*lanes) in the tile's column order: block u, gate g, lane v
    at u*4*lanes + g*bw + v (bw: the block's width, the tail's narrower)."""
    from lstm_export.runtimes.tvm_lstm.kernels.packing import tail_width
    out = np.zeros((gates.shape[0], blocks * 4 * lanes), gates.dtype)
    for u in range(blocks):
        bw = lanes if u < blocks - 1 else tail_width(hidden, lanes)
        for g in range(4):
            for v in range(min(bw, hidden - u * lanes)):
                out[:, u * 4 * lanes + g * bw + v] = gates[:, g * hidden + u * lanes + v]
    return out


def test_tile_computes_bias_plus_x_w_plus_h_r():
    """Tiles of MR (across both register buffers) and of one row, over full and tail blocks, leave
    bias + x_t @ W + h @ R in the update's acc: checked against numpy in float64."""
    from lstm_export.runtimes.tvm_lstm.kernels.cpu_tiles import make_products, make_tile
    hidden, k, n_b = 20, 6, 4
    lay = layout(CellSpec(hidden, SIG, TANH, TANH), k, plan())
    pb, lanes, MR, HP = lay.passes[0], lay.plan.lanes, lay.plan.mr, lay.width
    UB, TW = pb.blocks, pb.tail  # 3 blocks: two full, a 4-lane tail
    W_SIZE, B_SIZE, R_SIZE = lay.w_size, lay.b_size, lay.r_size

    @T.macro
    def keep(mr, bw, acc, r0, u, t, n_t, n_b, p, lens, y, cs, hb, zr):  # the update: store acc as it is
        for r in T.serial(mr):
            if r0 + r < n_b:
                for i in T.serial(4 * bw):
                    y[r0 + r, u * 4 * lanes + i] = acc[r, i]

    tile = make_tile(lay, pb, make_products(lay, pb), keep)

    @T.prim_func(private=True, check_well_formed=False)
    def f(var_x: T.handle, wp: T.Buffer((W_SIZE,), "float32"), bias: T.Buffer((B_SIZE,), "float32"),
          rp: T.Buffer((R_SIZE,), "float32"), var_h: T.handle, rev_placeholder: T.int64, var_y: T.handle):
        n_b = T.int64()
        x = T.match_buffer(var_x, (1, n_b, k), "float32")  # (T=1, B, K)
        hb = T.match_buffer(var_h, (2, n_b, HP), "float32")  # (2, B, HP): h at [0]
        y = T.match_buffer(var_y, (n_b, UB * 4 * lanes), "float32")  # (B, UB*4*lanes): the gates
        lens = T.alloc_buffer((1,), "int32")  # (1,): no lengths (never read)
        for u in T.serial(UB - 1):
            tile(MR, lanes, u, T.int64(0), T.int64(0), T.int64(1), n_b, True, x, wp, bias, None, rp, None, lens, y,
                 None, hb, None)  # rows 0..2: two in acc, one in acc2
        tile(1, TW, UB - 1, T.int64(0), T.int64(0), T.int64(1), n_b, True, x, wp, bias, None, rp, None, lens, y,
             None, hb, None)  # the tail, one row at a time
        for b in T.serial(n_b - 1):
            tile(1, TW, UB - 1, b + 1, T.int64(0), T.int64(1), n_b, True, x, wp, bias, None, rp, None, lens, y,
                 None, hb, None)
        for u in T.serial(UB - 1):  # row 3 of the full blocks: one row
            tile(1, lanes, u, T.int64(MR), T.int64(0), T.int64(1), n_b, True, x, wp, bias, None, rp, None, lens, y,
                 None, hb, None)

    x, h, w, r, bias = gate_inputs(0, n_b, k, hidden)
    hb = np.zeros((2, n_b, HP), np.float32)
    hb[0, :, :hidden] = h
    y = np.zeros((n_b, UB * 4 * lanes), np.float32)
    out = run(with_rev(f, lay, 5), x, pack_gates(w, hidden, lanes), pack_bias(bias, hidden, lanes),
              pack_gates(r, hidden, lanes), hb, 0, y)[-1]
    want = packed_columns(bias + x[0].astype(np.float64) @ w.T + h.astype(np.float64) @ r.T, hidden, lanes, UB)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unit_major_bytes", [0, 1 << 30], ids=["block-major", "row-major"])
def test_projection_computes_bias_plus_x_w_for_every_row(unit_major_bytes):
    """project_rows (the row path's GEMM) writes bias + x[t, b] @ W for all T*B rows, in tiles of MR
    rows and a ragged last tile, its items unit-block-major or row-tile-major."""
    from lstm_export.runtimes.tvm_lstm.kernels.cpu_tiles import make_products, make_projection
    hidden, k, n_t, n_b = 20, 6, 4, 2  # 8 rows: tiles of 3, 3 and 2
    lay = layout(CellSpec(hidden, SIG, TANH, TANH), k, plan(unit_major_bytes=unit_major_bytes))
    pb, lanes, UB = lay.passes[0], lay.plan.lanes, lay.passes[0].blocks
    assert pb.unit_major == (unit_major_bytes == 0)
    W_SIZE, B_SIZE = lay.w_size, lay.b_size
    project_rows = make_projection(lay, pb, make_products(lay, pb).x_times_w)

    @T.prim_func(private=True)
    def f(var_x: T.handle, wp: T.Buffer((W_SIZE,), "float32"), bias: T.Buffer((B_SIZE,), "float32"),
          var_xw: T.handle):
        n_t = T.int64()
        n_b = T.int64()
        x = T.match_buffer(var_x, (n_t, n_b, k), "float32")  # (T, B, K)
        xw = T.match_buffer(var_xw, (n_t, n_b, B_SIZE), "float32")  # (T, B, B_SIZE)
        project_rows(n_t, n_b, x, wp, bias, xw)

    rng = np.random.default_rng(1)
    x = rng.standard_normal((n_t, n_b, k)).astype(np.float32)  # (T, B, K)
    w = rng.standard_normal((4 * hidden, k)).astype(np.float32)  # (4H, K)
    bias = rng.standard_normal(4 * hidden).astype(np.float32)  # (4H,)
    out = run(f.with_attr("global_symbol", "main"), x, pack_gates(w, hidden, lanes), pack_bias(bias, hidden, lanes),
              np.zeros((n_t, n_b, B_SIZE), np.float32))[-1]
    gates = bias + x.reshape(-1, k).astype(np.float64) @ w.T  # (T*B, 4H)
    want = packed_columns(gates, hidden, lanes, UB)[:, :B_SIZE]  # (T*B, B_SIZE)
    np.testing.assert_allclose(out.reshape(n_t * n_b, -1), want, rtol=1e-5, atol=1e-5)


# --- the assembled layer ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch_split", [True, False], ids=["batch-split", "step-split"])
def test_layer_matches_torch_lstm(batch_split):
    """make_cpu_layer's PrimFunc, forward and reverse, on the batched path (B=7 >= MR) and the row
    path (B=2), matches torch.nn.LSTM in float64 (the kernel's sigmoid and tanh are approximations)."""
    torch = pytest.importorskip("torch")
    from lstm_export.runtimes.tvm_lstm.kernels.cpu import make_cpu_layer
    from lstm_export.runtimes.tvm_lstm.kernels.packing import padded
    hidden, k, n_t, lanes = 20, 7, 5, 8
    p = plan(batch_split_bytes=1 << 40 if batch_split else 0)
    f = make_cpu_layer(CellSpec(hidden, SIG, TANH, TANH), k, p, has_state=True, has_peepholes=False)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=TARGET)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(k, hidden).double()
    # torch's gates i, f, g, o -> ONNX's i, o, f, c (pack_gates' order)
    onnx_order = lambda a: np.concatenate([a[0:hidden], a[3 * hidden:], a[hidden:2 * hidden],  # noqa: E731
                                           a[2 * hidden:3 * hidden]]).astype(np.float32)
    sd = {name: t.detach().numpy() for name, t in ref.state_dict().items()}
    wp = pack_gates(onnx_order(sd["weight_ih_l0"]), hidden, lanes)
    rp = pack_gates(onnx_order(sd["weight_hh_l0"]), hidden, lanes)
    bias = pack_bias(onnx_order(sd["bias_ih_l0"] + sd["bias_hh_l0"]), hidden, lanes)
    peep = np.zeros((3, padded(hidden, lanes)), np.float32)
    rng = np.random.default_rng(2)
    for n_b in (7, 2):
        x = rng.standard_normal((n_t, n_b, k)).astype(np.float32)  # (T, B, K)
        h0, c0 = (rng.standard_normal((n_b, hidden)).astype(np.float32) for _ in range(2))  # (B, H)
        for rev in (0, 1):
            outs = [tvm.runtime.tensor(np.zeros(s, np.float32)) for s in ((n_t, n_b, hidden), (n_b, hidden),
                                                                          (n_b, hidden))]
            lib["main"](*(tvm.runtime.tensor(a) for a in (x, wp, bias, rp, peep, h0, c0, np.zeros(1, np.int32))),
                        rev, *outs)
            y, hn, cn = (o.numpy() for o in outs)
            xs = torch.from_numpy(x[::-1].copy() if rev else x).double()
            want_y, (want_h, want_c) = ref(xs, (torch.from_numpy(h0)[None].double(),
                                                torch.from_numpy(c0)[None].double()))
            want_y = want_y.detach().numpy()[::-1] if rev else want_y.detach().numpy()
            np.testing.assert_allclose(y, want_y, atol=2e-5, err_msg=f"y, B={n_b}, rev={rev}")
            np.testing.assert_allclose(hn, want_h.detach().numpy()[0], atol=2e-5)
            np.testing.assert_allclose(cn, want_c.detach().numpy()[0], atol=2e-5)
