"""The LSTM time loop as one TIR PrimFunc: symbolic T and B, a serial loop over time.

ONNX semantics (spec names): gates in order i, o, f, c; activations f, g, h applied as
  it = f(Xt*Wi + Ht-1*Ri + Pi (.) Ct-1 + Wbi + Rbi)
  ft = f(Xt*Wf + Ht-1*Rf + Pf (.) Ct-1 + Wbf + Rbf)      (ft = 1 - it when input_forget)
  ct = g(Xt*Wc + Ht-1*Rc + Wbc + Rbc)
  Ct = ft (.) Ct-1 + it (.) ct
  ot = f(Xt*Wo + Ht-1*Ro + Po (.) Ct + Wbo + Rbo)
  Ht = ot (.) h(Ct)
`clip` bounds every pre-activation to [-clip, clip]. The input projection X*W^T + Wb + Rb for
all steps arrives precomputed (one GEMM in Relax), so the loop only does H*R^T and the gates.
With sequence_lens, steps t >= len[b] emit zeros and keep the state; the reverse direction
starts each sequence at its own last valid step, as ONNX Runtime does.
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T


def activation(name: str, alpha: float | None, beta: float | None):
    """The ONNX RNN activation `name` as a PrimExpr -> PrimExpr function (defaults from the spec)."""
    key = name.lower()
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    one, zero = f32(1.0), f32(0.0)
    if key == "sigmoid":
        return lambda x: tirx.sigmoid(x)
    if key == "tanh":
        return lambda x: tirx.tanh(x)
    if key == "relu":
        return lambda x: tirx.max(x, zero)
    if key == "affine":
        a, b = f32(alpha if alpha is not None else 1.0), f32(beta if beta is not None else 0.0)
        return lambda x: a * x + b
    if key == "leakyrelu":
        a = f32(alpha if alpha is not None else 0.01)
        return lambda x: tirx.Select(x >= zero, x, a * x)
    if key == "thresholdedrelu":
        a = f32(alpha if alpha is not None else 1.0)
        return lambda x: tirx.Select(x > a, x, zero)
    if key == "scaledtanh":
        a, b = f32(alpha if alpha is not None else 1.0), f32(beta if beta is not None else 1.0)
        return lambda x: a * tirx.tanh(b * x)
    if key == "hardsigmoid":
        a, b = f32(alpha if alpha is not None else 0.2), f32(beta if beta is not None else 0.5)
        return lambda x: tirx.max(zero, tirx.min(one, a * x + b))
    if key == "elu":
        a = f32(alpha if alpha is not None else 1.0)
        return lambda x: tirx.Select(x >= zero, x, a * (tirx.exp(x) - one))
    if key == "softsign":
        return lambda x: x / (one + tirx.abs(x))
    if key == "softplus":
        return lambda x: tirx.log(one + tirx.exp(x))
    raise ValueError(f"unsupported activation {name!r}")


SUPPORTED_ACTIVATIONS = ("Sigmoid", "Tanh", "Relu", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh",
                         "HardSigmoid", "Elu", "Softsign", "Softplus")


@dataclass(frozen=True)
class CellSpec:
    """What one direction's loop computes; each distinct spec is one PrimFunc."""

    hidden: int
    f: tuple  # (name, alpha, beta)
    g: tuple
    h: tuple
    clip: float | None = None
    input_forget: bool = False
    reverse: bool = False
    has_lens: bool = False  # else every sequence runs all T steps


class Lets:
    """The Let-bound subexpressions of one expression: `let(value, name)` gives a fresh variable
    for value, `wrap(body)` binds them all around body, in order.

    Written out, the clamped x of a tanh appears 11 times in its numerator and denominator, and the
    cell update uses each gate's parts two or three times: the expression trees grew so large that
    an LSTM layer's kernel printed to 319 KB and the lowering passes that walk every load took most
    of its build (s_tir.CompactBufferAllocation alone 1.2 s). Bound once, each subexpression is one
    node. Measured on a Zen 4 VM: outputs bit for bit those of the written-out kernels on the five
    bench shapes and a peephole LSTM, run time within noise (0.97-1.03x), builds 1.2-2.4x faster.
    Invariant: a variable is bound once (TIR is SSA), so an expression that holds Lets is used once;
    values used twice are bound here, not repeated."""

    def __init__(self):
        self.bound = []

    def __call__(self, value, name: str):
        var = tirx.Var(name, "float32")  # the gate math is float32 throughout
        self.bound.append((var, value))
        return var

    def wrap(self, body):
        for var, value in reversed(self.bound):
            body = tirx.Let(var, value, body)
        return body


class GateMath:
    """The per-unit LSTM update on PrimExprs, shared by the CPU and the CUDA loops."""

    def __init__(self, spec):
        """spec: a CellSpec, or any spec with clip, reverse and has_lens (the GRU and RNN loops use
        the clip, length and step-index rules only)."""
        self.spec = spec
        if isinstance(spec, CellSpec):
            self.f, self.g, self.h = (activation(*a) for a in (spec.f, spec.g, spec.h))

    def clip(self, x):
        c = self.spec.clip
        if c is None:
            return x
        return tirx.max(tirx.min(x, tirx.const(c, "float32")), tirx.const(-c, "float32"))

    def seq_len(self, lens_b, n_t):
        """Steps sequence b runs: its length with sequence_lens, else all T."""
        return tirx.Cast("int64", lens_b) if self.spec.has_lens else n_t

    def step_index(self, t, length):
        """The time index iteration t handles: reverse starts at the sequence's own last valid step."""
        return length - 1 - t if self.spec.reverse else t

    @staticmethod
    def peephole(x, p, c):
        """x + p (.) c; p None means no peepholes (the term is left out, not multiplied by zero)."""
        return x if p is None else x + p * c

    def cell_c(self, xi, xf, xc, pi, pf, c_prev):
        """The new cell from gate pre-activations (projection + recurrent) i, f, c."""
        it = self.f(self.clip(self.peephole(xi, pi, c_prev)))
        if self.spec.input_forget:  # i used twice: bound once (an activation may hold Lets)
            let = Lets()
            i = let(it, "i")
            return let.wrap((tirx.const(1.0, "float32") - i) * c_prev + i * self.g(self.clip(xc)))
        ft = self.f(self.clip(self.peephole(xf, pf, c_prev)))
        return ft * c_prev + it * self.g(self.clip(xc))

    def cell_h(self, xo, po, c_new):
        """The new hidden state from the o pre-activation and the new cell. Callers store c first
        and pass the stored value: an h expression built on c_prev and evaluated after c was
        overwritten would read the new c as the previous one."""
        return self.f(self.clip(self.peephole(xo, po, c_new))) * self.h(c_new)



def make_recurrence(spec: CellSpec):
    """PrimFunc(xw (T,B,4H), r_t (H,4H), p (3H), h0 (B,H), c0 (B,H), lens (B,) int32) -> y (T,B,H), h (B,H), c (B,H).

    xw holds X*W^T + Wb + Rb in ONNX gate order i, o, f, c; r_t is R transposed; p the peepholes.
    """
    H = spec.hidden
    m = GateMath(spec)

    @T.prim_func(private=True, s_tir=True)
    def lstm_recurrence(var_xw: T.handle, var_rt: T.handle, var_p: T.handle, var_h0: T.handle, var_c0: T.handle,
                        var_lens: T.handle, var_y: T.handle, var_hn: T.handle, var_cn: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True})
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
        with T.sblock("root"):
            T.reads()
            T.writes()
            gates = T.sblock_alloc_buffer((n_b, 4 * H), "float32")
            for b0, j0 in T.grid(n_b, H):
                with T.sblock("init"):
                    vb, vj = T.axis.remap("SS", [b0, j0])
                    hn[vb, vj] = h0[vb, vj]
                    cn[vb, vj] = c0[vb, vj]
            for t in T.serial(n_t):
                for b1, j1, k in T.grid(n_b, 4 * H, H):
                    with T.sblock("recurrent"):
                        vb, vj, vk = T.axis.remap("SSR", [b1, j1, k])
                        with T.init():
                            gates[vb, vj] = T.float32(0)
                        gates[vb, vj] = gates[vb, vj] + hn[vb, vk] * rt[vk, vj]
                for b2, j2 in T.grid(n_b, H):
                    with T.sblock("cell"):
                        vb, vj = T.axis.remap("SS", [b2, j2])
                        vt = T.axis.opaque(n_t, t)  # the time loop is sequential: t is an opaque axis
                        length = T.meta_var(m.seq_len(lens[vb], n_t))
                        tc = T.meta_var(T.max(T.min(m.step_index(vt, length), n_t - 1), T.int64(0)))
                        valid = T.meta_var(vt < length)
                        if valid:  # c first; h from the stored new c
                            cn[vb, vj] = m.cell_c(xw[tc, vb, vj] + gates[vb, vj],
                                                  xw[tc, vb, 2 * H + vj] + gates[vb, 2 * H + vj],
                                                  xw[tc, vb, 3 * H + vj] + gates[vb, 3 * H + vj],
                                                  p[vj], p[2 * H + vj], cn[vb, vj])
                            hn[vb, vj] = m.cell_h(xw[tc, vb, H + vj] + gates[vb, H + vj], p[H + vj], cn[vb, vj])
                            y[tc, vb, vj] = hn[vb, vj]
                for b3, j3 in T.grid(n_b, H):
                    with T.sblock("pad"):
                        vb, vj = T.axis.remap("SS", [b3, j3])
                        vt = T.axis.opaque(n_t, t)
                        if vt >= m.seq_len(lens[vb], n_t):
                            y[vt, vb, vj] = T.float32(0)


    return lstm_recurrence
