"""Vectorizable sigmoid and tanh for the fast CPU kernel, and the gate math that uses them.

sigmoid and tanh use a rational approximation (as Eigen and ONNX Runtime's MLAS do): only FMAs and
one division, so LLVM vectorizes them on every ISA; other activations keep TVM's exact intrinsics.
"""
from __future__ import annotations

from tvm import tirx

from .recurrence import CellSpec, GateMath, Lets, activation

# Rational tanh approximation for float32 (Eigen's generic_fast_tanh_float coefficients).
_A = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
      -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_B = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)


def tanh_parts(x, let):
    """tanh(x) as (numerator, denominator) of the rational approximation; |numerator| <= denominator,
    and the denominator lies in [4.9e-3, 1], so products of a few of them stay normal floats.
    let(value, name) binds a subexpression (a Lets); the denominator is bound because callers use
    it more than once."""
    f = lambda v: tirx.const(v, "float32")  # noqa: E731
    x = let(tirx.max(tirx.min(x, f(7.90531110763549805)), f(-7.90531110763549805)), "x")
    x2 = let(x * x, "x2")
    p = f(_A[6])
    for a in (_A[5], _A[4], _A[3], _A[2], _A[1], _A[0]):
        p = p * x2 + f(a)
    q = f(_B[3])
    for b in (_B[2], _B[1], _B[0]):
        q = q * x2 + f(b)
    return x * p, let(q, "q")


def sigmoid_parts(x, let):
    """sigmoid(x) = 0.5 + 0.5 tanh(x / 2) as (numerator, denominator)."""
    half = tirx.const(0.5, "float32")
    n, q = tanh_parts(half * x, let)
    return half * (q + n), q


def fast_tanh(x):
    let = Lets()
    n, q = tanh_parts(x, let)
    return let.wrap(n / q)


def fast_sigmoid(x):
    let = Lets()
    n, q = sigmoid_parts(x, let)
    return let.wrap(n / q)


class FastGateMath(GateMath):
    """GateMath with the default activations swapped for their vectorizable approximations.

    With the default activations (sigmoid, tanh, tanh) and no input_forget, the cell update puts
    each half of the cell over one common denominator: 2 vector divisions per unit instead of 5.
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
        let = Lets()
        ni, qi = sigmoid_parts(self.clip(self.peephole(xi, pi, c_prev)), let)
        nf, qf = sigmoid_parts(self.clip(self.peephole(xf, pf, c_prev)), let)
        ng, qg = tanh_parts(self.clip(xc), let)
        qig = let(qi * qg, "qig")
        # f * c + i * g = (nf/qf) c + (ni/qi)(ng/qg)
        return let.wrap((nf * c_prev * qig + ni * ng * qf) / (qf * qig))

    def cell_h(self, xo, po, c_new):
        if not self.shared_division:
            return super().cell_h(xo, po, c_new)
        let = Lets()
        no, qo = sigmoid_parts(self.clip(self.peephole(xo, po, c_new)), let)
        nc, qc = tanh_parts(c_new, let)
        return let.wrap((no * nc) / (qo * qc))


class FastLoopMath(GateMath):
    """GRU and RNN activations (spec.acts: f, g or f) with sigmoid and tanh swapped for their
    vectorizable approximations; clip, lengths and step order as GateMath."""

    def __init__(self, spec):
        super().__init__(spec)
        # Each activation binds its own parts (fast_sigmoid, fast_tanh); the callers use each
        # result once (cpu_cells.gru_h writes z twice rather than binding it: see there). The
        # written-out activations made a GRU0 layer's CompactBufferAllocation take 2.6 s (0.8 now).
        fast = {"sigmoid": fast_sigmoid, "tanh": fast_tanh}
        self.acts = tuple(fast.get(a[0].lower()) or activation(*a) for a in spec.acts)
