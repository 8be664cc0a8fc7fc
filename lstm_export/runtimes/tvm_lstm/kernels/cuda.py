"""CUDA lowering: our LSTM, GRU and RNN recurrences as persistent kernels, and dlight schedules for
everything else.

The recurrence kernel runs one thread block per sequence for the whole time loop: h lives in
shared memory, each thread owns hidden units j (its four gate columns of R^T stream from L2),
and two block barriers per step separate reading h from writing it. No launch per step.
"""
from __future__ import annotations

from tvm.script import tirx as T

from .recurrence import CellSpec, GateMath, activation

MAX_THREADS = 1024


def make_cuda_recurrence(spec: CellSpec):
    """Same signature and semantics as recurrence.make_recurrence, scheduled for CUDA."""
    H = spec.hidden
    NT = min(H, MAX_THREADS)  # threads per block
    J = (H + NT - 1) // NT  # hidden units per thread
    m = GateMath(spec)

    @T.prim_func(private=True, s_tir=True)
    def lstm_recurrence_cuda(var_xw: T.handle, var_rt: T.handle, var_p: T.handle, var_h0: T.handle,
                             var_c0: T.handle, var_lens: T.handle, var_y: T.handle, var_hn: T.handle,
                             var_cn: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n_t = T.int64()
        n_b = T.int64()
        xw = T.match_buffer(var_xw, (n_t, n_b, 4 * H), "float32")
        rt = T.match_buffer(var_rt, (H, 4 * H), "float32")
        p = T.match_buffer(var_p, (3 * H,), "float32")
        h0 = T.match_buffer(var_h0, (n_b, H), "float32")
        c0 = T.match_buffer(var_c0, (n_b, H), "float32")
        lens = T.match_buffer(var_lens, (n_b,), "int32")
        y = T.match_buffer(var_y, (n_t, n_b, H), "float32")
        hn = T.match_buffer(var_hn, (n_b, H), "float32")
        cn = T.match_buffer(var_cn, (n_b, H), "float32")
        for bx in T.thread_binding(n_b, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                with T.sblock("lstm_persistent"):
                    T.reads()
                    T.writes()
                    h_s = T.sblock_alloc_buffer((H,), "float32", scope="shared")
                    c_l = T.sblock_alloc_buffer((J,), "float32", scope="local")
                    h_l = T.sblock_alloc_buffer((J,), "float32", scope="local")
                    acc = T.sblock_alloc_buffer((4,), "float32", scope="local")
                    for jj in T.serial(J):
                        if jj * NT + tx < H:
                            h_s[jj * NT + tx] = h0[bx, jj * NT + tx]
                            c_l[jj] = c0[bx, jj * NT + tx]
                            h_l[jj] = h0[bx, jj * NT + tx]
                    T.tvm_storage_sync("shared")
                    length: T.let[T.int64] = m.seq_len(lens[bx], n_t)
                    for t in T.serial(n_t):
                        for jj in T.serial(J):
                            if jj * NT + tx < H:
                                if t < length:
                                    for g in T.unroll(4):
                                        acc[g] = T.float32(0)
                                    for k in T.serial(H):
                                        for g in T.unroll(4):
                                            acc[g] = acc[g] + h_s[k] * rt[k, g * H + jj * NT + tx]
                                    ts: T.let[T.int64] = m.step_index(t, length)
                                    j: T.let[T.int64] = T.Cast("int64", jj * NT + tx)
                                    # c first, then h from the stored new c (see GateMath.cell_h)
                                    c_l[jj] = m.cell_c(xw[ts, bx, j] + acc[0], xw[ts, bx, 2 * H + j] + acc[2],
                                                       xw[ts, bx, 3 * H + j] + acc[3], p[j], p[2 * H + j], c_l[jj])
                                    h_l[jj] = m.cell_h(xw[ts, bx, H + j] + acc[1], p[H + j], c_l[jj])
                                    y[ts, bx, j] = h_l[jj]
                                else:
                                    y[t, bx, jj * NT + tx] = T.float32(0)
                        T.tvm_storage_sync("shared")  # everyone has read h_{t-1}
                        for jj in T.serial(J):
                            if jj * NT + tx < H:
                                h_s[jj * NT + tx] = h_l[jj]
                        T.tvm_storage_sync("shared")  # h_t is complete before step t+1 reads it
                    for jj in T.serial(J):
                        if jj * NT + tx < H:
                            hn[bx, jj * NT + tx] = h_l[jj]
                            cn[bx, jj * NT + tx] = c_l[jj]

    return lstm_recurrence_cuda


def schedule_for_cuda(mod, target):
    """Legalizes Relax ops and gives every unscheduled TIR function a dlight GPU schedule."""
    from tvm import relax
    from tvm.s_tir import dlight as dl
    mod = relax.transform.LegalizeOps()(mod)
    mod = relax.transform.AnnotateTIROpPattern()(mod)
    mod = relax.transform.FoldConstant()(mod)
    mod = relax.transform.FuseOps()(mod)
    mod = relax.transform.FuseTIR()(mod)
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                      dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
    return mod


def make_cuda_loop(spec):
    """The GRU / RNN loop (gru_rnn_loop.make_loop's signature and semantics) as the same persistent
    kernel: one thread block per sequence, h in shared memory, each thread owning hidden units.
    GRU with linear_before_reset = 0 needs r of every unit before (r (.) Ht-1) * Rh: r (.) Ht-1 goes
    to a second shared buffer between two more block barriers."""
    H, G = spec.hidden, spec.gates
    NT = min(H, MAX_THREADS)
    J = (H + NT - 1) // NT
    m = GateMath(spec)  # clip, lengths and step order
    f = activation(*spec.acts[0])
    g = activation(*spec.acts[1]) if spec.kind == "GRU" else None
    two_phase = spec.kind == "GRU" and not spec.linear_before_reset
    first = 2 if two_phase else G  # groups of R read from h itself
    one = T.float32(1)

    @T.prim_func(private=True, s_tir=True)
    def rnn_loop_cuda(var_xw: T.handle, var_rt: T.handle, var_rbh: T.handle, var_h0: T.handle,
                      var_lens: T.handle, var_y: T.handle, var_hn: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n_t = T.int64()
        n_b = T.int64()
        xw = T.match_buffer(var_xw, (n_t, n_b, G * H), "float32")
        rt = T.match_buffer(var_rt, (H, G * H), "float32")
        rbh = T.match_buffer(var_rbh, (H,), "float32")
        h0 = T.match_buffer(var_h0, (n_b, H), "float32")
        lens = T.match_buffer(var_lens, (n_b,), "int32")
        y = T.match_buffer(var_y, (n_t, n_b, H), "float32")
        hn = T.match_buffer(var_hn, (n_b, H), "float32")
        for bx in T.thread_binding(n_b, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                with T.sblock("rnn_persistent"):
                    T.reads()
                    T.writes()
                    h_s = T.sblock_alloc_buffer((H,), "float32", scope="shared")
                    rh_s = T.sblock_alloc_buffer((H,), "float32", scope="shared")  # r (.) Ht-1 (two_phase)
                    h_l = T.sblock_alloc_buffer((J,), "float32", scope="local")
                    z_l = T.sblock_alloc_buffer((J,), "float32", scope="local")
                    acc = T.sblock_alloc_buffer((3,), "float32", scope="local")
                    for jj in T.serial(J):
                        if jj * NT + tx < H:
                            h_s[jj * NT + tx] = h0[bx, jj * NT + tx]
                            h_l[jj] = h0[bx, jj * NT + tx]
                    T.tvm_storage_sync("shared")
                    length: T.let[T.int64] = m.seq_len(lens[bx], n_t)
                    for t in T.serial(n_t):
                        ts: T.let[T.int64] = T.max(T.min(m.step_index(t, length), n_t - 1), T.int64(0))
                        for jj in T.serial(J):
                            if jj * NT + tx < H:
                                if t < length:
                                    for q in T.unroll(first):
                                        acc[q] = T.float32(0)
                                    for k in T.serial(H):
                                        for q in T.unroll(first):
                                            acc[q] = acc[q] + h_s[k] * rt[k, q * H + jj * NT + tx]
                                    if G == 1:
                                        h_l[jj] = f(m.clip(xw[ts, bx, jj * NT + tx] + acc[0]))
                                        y[ts, bx, jj * NT + tx] = h_l[jj]
                                    elif not two_phase:
                                        z_l[jj] = f(m.clip(xw[ts, bx, jj * NT + tx] + acc[0]))
                                        acc[1] = f(m.clip(xw[ts, bx, H + jj * NT + tx] + acc[1]))  # r
                                        acc[2] = g(m.clip(xw[ts, bx, 2 * H + jj * NT + tx]
                                                          + acc[1] * (acc[2] + rbh[jj * NT + tx])))
                                        h_l[jj] = (one - z_l[jj]) * acc[2] + z_l[jj] * h_l[jj]
                                        y[ts, bx, jj * NT + tx] = h_l[jj]
                                    else:
                                        z_l[jj] = f(m.clip(xw[ts, bx, jj * NT + tx] + acc[0]))
                                        rh_s[jj * NT + tx] = f(m.clip(xw[ts, bx, H + jj * NT + tx] + acc[1])) * \
                                            h_s[jj * NT + tx]
                                else:
                                    y[t, bx, jj * NT + tx] = T.float32(0)
                        if two_phase:
                            T.tvm_storage_sync("shared")  # r (.) Ht-1 is complete
                            for jj in T.serial(J):
                                if jj * NT + tx < H:
                                    if t < length:
                                        acc[2] = T.float32(0)
                                        for k in T.serial(H):
                                            acc[2] = acc[2] + rh_s[k] * rt[k, 2 * H + jj * NT + tx]
                                        acc[2] = g(m.clip(xw[ts, bx, 2 * H + jj * NT + tx] + acc[2]))
                                        h_l[jj] = (one - z_l[jj]) * acc[2] + z_l[jj] * h_l[jj]
                                        y[ts, bx, jj * NT + tx] = h_l[jj]
                        T.tvm_storage_sync("shared")  # everyone has read Ht-1 (and r (.) Ht-1)
                        for jj in T.serial(J):
                            if jj * NT + tx < H:
                                h_s[jj * NT + tx] = h_l[jj]
                        T.tvm_storage_sync("shared")  # Ht is complete before step t+1 reads it
                    for jj in T.serial(J):
                        if jj * NT + tx < H:
                            hn[bx, jj * NT + tx] = h_l[jj]

    return rnn_loop_cuda
