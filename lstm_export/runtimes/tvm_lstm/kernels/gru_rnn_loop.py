"""The GRU and RNN time loops as TIR PrimFuncs, the LSTM loop's variants (recurrence.py): the same
symbolic T and B, the same sequence_lens and reverse handling (GateMath), another cell.

ONNX semantics (spec names), gates of GRU in order z, r, h; activations f, g (GRU) or f (RNN):
  GRU  zt = f(Xt*Wz + Ht-1*Rz + Wbz + Rbz)          rt = f(Xt*Wr + Ht-1*Rr + Wbr + Rbr)
       ht = g(Xt*Wh + (rt (.) Ht-1)*Rh + Rbh + Wbh)      linear_before_reset = 0
       ht = g(Xt*Wh + rt (.) (Ht-1*Rh + Rbh) + Wbh)      linear_before_reset != 0
       Ht = (1 - zt) (.) ht + zt (.) Ht-1
  RNN  Ht = f(Xt*Wi + Ht-1*Ri + Wbi + Rbi)
`clip` bounds every pre-activation. xw = X*W^T + Wb + the recurrent biases that sit outside a
product arrives precomputed; `rbh` is Rbh where it sits inside r (.) (...), else zeros. The new
state of every unit is computed into `hnext` before any is stored: each reads all of Ht-1.
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from .recurrence import GateMath, activation


@dataclass(frozen=True)
class LoopSpec:
    """One direction of a GRU or RNN loop (the LSTM's is recurrence.CellSpec)."""

    kind: str  # "GRU" | "RNN"
    hidden: int
    acts: tuple  # ((name, alpha, beta), ...): f, g for GRU; f for RNN
    clip: float | None = None
    reverse: bool = False
    has_lens: bool = False
    linear_before_reset: bool = False

    @property
    def gates(self) -> int:
        return 3 if self.kind == "GRU" else 1


def make_loop(spec: LoopSpec):
    """PrimFunc(xw (T,B,G*H), r_t (H,G*H), rbh (H,), h0 (B,H), lens (B,) int32) -> y (T,B,H), h (B,H)."""
    H, G = spec.hidden, spec.gates
    m = GateMath(spec)  # seq_len, step_index and clip read only has_lens, reverse and clip
    f = activation(*spec.acts[0])
    g = activation(*spec.acts[1]) if spec.kind == "GRU" else None
    lbr = spec.linear_before_reset
    one = tirx.const(1.0, "float32")
    # the recurrent product at the step start covers z, r (and h when linear before reset)
    first = G * H if spec.kind == "RNN" or lbr else 2 * H

    @T.prim_func(private=True, s_tir=True)
    def rnn_loop(var_xw: T.handle, var_rt: T.handle, var_rbh: T.handle, var_h0: T.handle, var_lens: T.handle,
                 var_y: T.handle, var_hn: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True})
        n_t = T.int64()
        n_b = T.int64()
        xw = T.match_buffer(var_xw, (n_t, n_b, G * H), "float32")
        rt = T.match_buffer(var_rt, (H, G * H), "float32")
        rbh = T.match_buffer(var_rbh, (H,), "float32")
        h0 = T.match_buffer(var_h0, (n_b, H), "float32")
        lens = T.match_buffer(var_lens, (n_b,), "int32")
        y = T.match_buffer(var_y, (n_t, n_b, H), "float32")
        hn = T.match_buffer(var_hn, (n_b, H), "float32")
        with T.sblock("root"):
            T.reads()
            T.writes()
            acc = T.sblock_alloc_buffer((n_b, G * H), "float32")
            acc_h = T.sblock_alloc_buffer((n_b, H), "float32")  # (r (.) Ht-1) * Rh: its own buffer, its own writer
            gate_r = T.sblock_alloc_buffer((n_b, H), "float32")
            hnext = T.sblock_alloc_buffer((n_b, H), "float32")
            for b0, j0 in T.grid(n_b, H):
                with T.sblock("init"):
                    vb, vj = T.axis.remap("SS", [b0, j0])
                    hn[vb, vj] = h0[vb, vj]
            for t in T.serial(n_t):
                for b1, j1, k in T.grid(n_b, first, H):
                    with T.sblock("recurrent"):
                        vb, vj, vk = T.axis.remap("SSR", [b1, j1, k])
                        with T.init():
                            acc[vb, vj] = T.float32(0)
                        acc[vb, vj] = acc[vb, vj] + hn[vb, vk] * rt[vk, vj]
                if G == 3 and not lbr:  # (r (.) Ht-1) * Rh needs r first
                    for b2, j2 in T.grid(n_b, H):
                        with T.sblock("reset"):
                            vb, vj = T.axis.remap("SS", [b2, j2])
                            vt = T.axis.opaque(n_t, t)
                            length = T.meta_var(m.seq_len(lens[vb], n_t))
                            tc = T.meta_var(T.max(T.min(m.step_index(vt, length), n_t - 1), T.int64(0)))
                            gate_r[vb, vj] = f(m.clip(xw[tc, vb, H + vj] + acc[vb, H + vj])) * hn[vb, vj]
                    for b3, j3, k3 in T.grid(n_b, H, H):
                        with T.sblock("recurrent_h"):
                            vb, vj, vk = T.axis.remap("SSR", [b3, j3, k3])
                            with T.init():
                                acc_h[vb, vj] = T.float32(0)
                            acc_h[vb, vj] = acc_h[vb, vj] + gate_r[vb, vk] * rt[vk, 2 * H + vj]
                for b4, j4 in T.grid(n_b, H):
                    with T.sblock("cell"):
                        vb, vj = T.axis.remap("SS", [b4, j4])
                        vt = T.axis.opaque(n_t, t)
                        length = T.meta_var(m.seq_len(lens[vb], n_t))
                        tc = T.meta_var(T.max(T.min(m.step_index(vt, length), n_t - 1), T.int64(0)))
                        if G == 1:
                            hnext[vb, vj] = f(m.clip(xw[tc, vb, vj] + acc[vb, vj]))
                        else:
                            z = T.meta_var(f(m.clip(xw[tc, vb, vj] + acc[vb, vj])))
                            if lbr:
                                r = T.meta_var(f(m.clip(xw[tc, vb, H + vj] + acc[vb, H + vj])))
                                hh = T.meta_var(g(m.clip(xw[tc, vb, 2 * H + vj] + r * (acc[vb, 2 * H + vj] + rbh[vj]))))
                                hnext[vb, vj] = (one - z) * hh + z * hn[vb, vj]
                            else:
                                hh = T.meta_var(g(m.clip(xw[tc, vb, 2 * H + vj] + acc_h[vb, vj])))
                                hnext[vb, vj] = (one - z) * hh + z * hn[vb, vj]
                for b5, j5 in T.grid(n_b, H):
                    with T.sblock("store"):
                        vb, vj = T.axis.remap("SS", [b5, j5])
                        vt = T.axis.opaque(n_t, t)
                        length = T.meta_var(m.seq_len(lens[vb], n_t))
                        tc = T.meta_var(T.max(T.min(m.step_index(vt, length), n_t - 1), T.int64(0)))
                        if vt < length:  # past its length a sequence keeps its state
                            hn[vb, vj] = hnext[vb, vj]
                            y[tc, vb, vj] = hnext[vb, vj]
                for b6, j6 in T.grid(n_b, H):
                    with T.sblock("pad"):
                        vb, vj = T.axis.remap("SS", [b6, j6])
                        vt = T.axis.opaque(n_t, t)
                        if vt >= m.seq_len(lens[vb], n_t):
                            y[vt, vb, vj] = T.float32(0)

    return rnn_loop


def schedule_loop(func, lanes: int = 16):
    """The loop's per-step products across cores and vector lanes (the time loop stays serial):
    output units split into lanes, the reduction outside them, (batch row, unit block) pairs in
    parallel."""
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    for name in ("recurrent", "recurrent_h"):
        try:
            block = sch.get_sblock(name)
        except Exception:  # recurrent_h exists only for GRU with linear_before_reset = 0
            continue
        _, b, j, k = sch.get_loops(block)
        extent = int(sch.get(j).extent)
        if extent % lanes == 0:
            jo, ji = sch.split(j, [None, lanes])
            sch.reorder(b, jo, k, ji)
            sch.parallel(sch.fuse(b, jo))
            sch.vectorize(ji)
        else:
            sch.reorder(b, k, j)
            sch.parallel(b)
        # no decompose_reduction: inside the serial time loop it fails; the init lowers to a k == 0 branch
    # the element-wise blocks (B*H per step against the products' B*H*H) stay serial: their opaque
    # time axis makes them blocks `parallel` refuses
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
