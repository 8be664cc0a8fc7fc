"""The fast CPU path: packed weights, a register-blocked projection GEMM and a fused recurrent step.

Layout: hidden units are grouped in blocks of LANES (16 floats = one AVX-512 register); for unit
block u the four ONNX gates i, o, f, c sit next to each other, so column n of the packed weights is
u*4*LANES + gate*LANES + lane. H is padded to a multiple of LANES with zero weights: padded units
never feed real ones (their rows of R are zero) and are never written out.

- `make_cpu_layer`: one PrimFunc per layer and direction. Per step, one parallel loop over
  (batch tile of MR rows, unit block) computes bias + x_t @ W + h @ R for its tile in registers and
  the cell update with the gates still there; h is double-buffered, so the parallel loop's end is
  the only barrier per step. Below MR batch rows the projection runs first as one GEMM.
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
UNIT_MAJOR_BYTES = 256 * 1024  # projection weights above this are split between cores, not shared


def padded(h: int) -> int:
    return (h + LANES - 1) // LANES * LANES


def pack_gates(w: np.ndarray, hidden: int, k_pad: int | None = None) -> np.ndarray:
    """ONNX-ordered (4H, K) weights -> (UB, K', 4, LANES) packed, zero-padded to UB*LANES units
    (and to K' = k_pad rows, for R whose K is the padded hidden size)."""
    hp = padded(hidden)
    k = k_pad or w.shape[1]
    out = np.zeros((4, hp, k), np.float32)
    out[:, :hidden, :w.shape[1]] = w.reshape(4, hidden, w.shape[1])
    return np.ascontiguousarray(out.reshape(4, hp // LANES, LANES, k).transpose(1, 3, 0, 2))


def pack_bias(b: np.ndarray, hidden: int) -> np.ndarray:
    """(4H,) -> (UB*4*LANES,) in the packed column order."""
    hp = padded(hidden)
    out = np.zeros((4, hp), np.float32)
    out[:, :hidden] = b.reshape(4, hidden)
    return np.ascontiguousarray(out.reshape(4, hp // LANES, LANES).transpose(1, 0, 2).reshape(-1))


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
        ni, qi = sigmoid_parts(self.clip(xi + pi * c_prev))
        nf, qf = sigmoid_parts(self.clip(xf + pf * c_prev))
        ng, qg = tanh_parts(self.clip(xc))
        # f * c + i * g = (nf/qf) c + (ni/qi)(ng/qg)
        return (nf * c_prev * (qi * qg) + ni * ng * qf) / (qf * (qi * qg))

    def cell_h(self, xo, po, c_new):
        if not self.shared_division:
            return super().cell_h(xo, po, c_new)
        no, qo = sigmoid_parts(self.clip(xo + po * c_new))
        nc, qc = tanh_parts(c_new)
        return (no * nc) / (qo * qc)


def make_cpu_layer(spec: CellSpec, k_dim: int, has_state: bool = True):
    """One direction of one layer, projection included:
    PrimFunc(x (T, B, K), wp (UB, K, 4, LANES), bias (NP,), rp (UB, HP, 4, LANES), p (3, HP),
    h0, c0 (B, H), lens (B,)) -> y (T, B, H), hn (B, H), cn (B, H).

    With B >= MR the input projection is fused into each step: a work item's register tile starts
    from bias + x_t @ W for its rows and unit block, then adds h @ R, so the T*B*4H projection is
    never written to memory and read back (it was 11 MB at T50 B128 H100, and evicted R from L2).
    With B < MR (serving) one x_t row per step would stream all of W per step, so the projection
    runs first over all T*B rows into a scratch buffer, spread over the cores, as one GEMM.
    The padded units live only in the kernel's own state buffers; y is written unpadded.

    Work items run unit-block-major, so each thread streams its own share of R from its cache.
    Without `has_state` (no initial_h/c) h0 and c0 are (1, H) placeholders and the state starts at
    zero; without sequence lengths lens is a (1,) placeholder. Neither costs a kernel launch.
    """
    H = spec.hidden
    HP = padded(H)
    UB = HP // LANES
    NP = UB * 4 * LANES
    m = FastGateMath(spec)
    first_product = tirx.const(0 if has_state else 1, "int64")
    LAST = H - (UB - 1) * LANES  # real units in the last unit block
    K = k_dim
    unit_major = K * NP * 4 > UNIT_MAJOR_BYTES

    def tile(w, n_tiles):
        return w % n_tiles

    def unit(w, n_tiles):
        return w // n_tiles

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

    @T.macro
    def x_times_w(mr, acc, rt, rb, u, x, wp, bias):
        """acc[r] = bias + x[rt[r], rb[r]] @ W for unit block u: the projection's register tile."""
        for r in T.unroll(mr):
            for g in T.unroll(4):
                for v in T.vectorized(LANES):
                    acc[r, g, v] = bias[u * 4 * LANES + g * LANES + v]
        for k in T.serial(K):
            for r in T.unroll(mr):
                for g in T.unroll(4):
                    for v in T.vectorized(LANES):
                        acc[r, g, v] = acc[r, g, v] + x[rt[r], rb[r], k] * wp[u, k, g, v]

    @T.macro
    def project_rows(mr, n_t, n_b, x, wp, bias, xw):
        """xw[t, b] = bias + x[t, b] @ W for every row; a work item is `mr` rows x one unit block."""
        for w in T.parallel(((n_t * n_b + mr - 1) // mr) * UB):
            acc = T.alloc_buffer((mr, 4, LANES), "float32", scope="local")
            rt = T.alloc_buffer((mr,), "int64", scope="local")  # each row's (t, b)
            rb = T.alloc_buffer((mr,), "int64", scope="local")
            mt: T.let[T.int64] = w % ((n_t * n_b + mr - 1) // mr) if unit_major else w // UB
            u: T.let[T.int64] = w // ((n_t * n_b + mr - 1) // mr) if unit_major else w % UB
            for r in T.unroll(mr):
                rt[r] = T.min(mt * mr + r, n_t * n_b - 1) // n_b
                rb[r] = T.min(mt * mr + r, n_t * n_b - 1) % n_b
            x_times_w(mr, acc, rt, rb, u, x, wp, bias)
            for r in T.unroll(mr):
                if mt * mr + r < n_t * n_b:
                    for g in T.unroll(4):
                        for v in T.vectorized(LANES):
                            xw[rt[r], rb[r], u * 4 * LANES + g * LANES + v] = acc[r, g, v]

    @T.macro
    def step(mr, fused, t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb):
        """One time step over every (batch tile of `mr` rows, unit block)."""
        for w in T.parallel(((n_b + mr - 1) // mr) * UB):
            acc = T.alloc_buffer((mr, 4, LANES), "float32", scope="local")
            bt: T.let[T.int64] = tile(w, (n_b + mr - 1) // mr)
            u: T.let[T.int64] = unit(w, (n_b + mr - 1) // mr)
            if fused:
                ts = T.alloc_buffer((mr,), "int64", scope="local")  # each row's (time index, batch row)
                tb = T.alloc_buffer((mr,), "int64", scope="local")
                for r in T.unroll(mr):
                    ts[r] = step_of(t, m.seq_len(lens[T.min(bt * mr + r, n_b - 1)], n_t), n_t)
                    tb[r] = T.min(bt * mr + r, n_b - 1)
                x_times_w(mr, acc, ts, tb, u, x, wp, bias)
            else:
                for r in T.unroll(mr):
                    for g in T.unroll(4):
                        for v in T.vectorized(LANES):
                            acc[r, g, v] = xw[step_of(t, m.seq_len(lens[T.min(bt * mr + r, n_b - 1)], n_t), n_t),
                                              T.min(bt * mr + r, n_b - 1), u * (4 * LANES) + g * LANES + v]
            if t >= first_product:  # without an initial state, h is zero at the first step: skip h @ R
                for k in T.serial(H):  # rows of R past H meet zero h: skipped
                    for r in T.unroll(mr):
                        for g in T.unroll(4):
                            for v in T.vectorized(LANES):
                                acc[r, g, v] = acc[r, g, v] + hb[t % 2, T.min(bt * mr + r, n_b - 1), k] * rp[u, k, g, v]
            for r in T.unroll(mr):
                if bt * mr + r < n_b:
                    if t < m.seq_len(lens[bt * mr + r], n_t):
                        for v in T.vectorized(LANES):
                            cs[bt * mr + r, u * LANES + v] = m.cell_c(
                                acc[r, 0, v], acc[r, 2, v], acc[r, 3, v], p[0, u * LANES + v],
                                p[2, u * LANES + v], cs[bt * mr + r, u * LANES + v])
                        for v in T.vectorized(LANES):
                            hb[1 - t % 2, bt * mr + r, u * LANES + v] = m.cell_h(
                                acc[r, 1, v], p[1, u * LANES + v], cs[bt * mr + r, u * LANES + v])
                        if u < UB - 1:
                            for v in T.vectorized(LANES):
                                y[step_of(t, m.seq_len(lens[bt * mr + r], n_t), n_t), bt * mr + r, u * LANES + v] = \
                                    hb[1 - t % 2, bt * mr + r, u * LANES + v]
                        else:
                            for v in T.vectorized(LAST):
                                y[step_of(t, m.seq_len(lens[bt * mr + r], n_t), n_t), bt * mr + r, u * LANES + v] = \
                                    hb[1 - t % 2, bt * mr + r, u * LANES + v]
                    else:
                        for v in T.vectorized(LANES):
                            hb[1 - t % 2, bt * mr + r, u * LANES + v] = hb[t % 2, bt * mr + r, u * LANES + v]
                        if u < UB - 1:
                            for v in T.vectorized(LANES):
                                y[t, bt * mr + r, u * LANES + v] = T.float32(0)
                        else:
                            for v in T.vectorized(LAST):
                                y[t, bt * mr + r, u * LANES + v] = T.float32(0)

    @T.prim_func(private=True)
    def lstm_layer_cpu(var_x: T.handle, wp: T.Buffer((UB, K, 4, LANES), "float32"), bias: T.Buffer((NP,), "float32"),
                       rp: T.Buffer((UB, HP, 4, LANES), "float32"), p: T.Buffer((3, HP), "float32"),
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
        if n_b >= MR:  # register tiles of MR batch rows share each load of W and R
            for t in T.serial(n_t):
                step(MR, True, t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb)
        else:  # small batches (serving): the projection as one GEMM first, then one row per tile
            if n_t * n_b >= MR:
                project_rows(MR, n_t, n_b, x, wp, bias, xw)
            else:
                project_rows(1, n_t, n_b, x, wp, bias, xw)
            for t in T.serial(n_t):
                step(1, False, t, n_t, n_b, x, wp, bias, xw, rp, p, lens, y, cs, hb)
        for b1 in T.serial(n_b):
            for j1 in T.serial(H):
                hn[b1, j1] = hb[n_t % 2, b1, j1]
                cn[b1, j1] = cs[b1, j1]

    return lstm_layer_cpu
