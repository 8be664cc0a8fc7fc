"""One LSTM layer and direction as one autograd node, on the native kernel (native/lstm_kernel.c).

The way the fastest RNN trainers work (oneDNN, cuDNN, DeepCPU): the input projection of every step
is one GEMM; the forward loop saves only what backward needs (the activated gates, c_{t-1},
tanh(c_t), h_{t-1}); backward walks the steps with only dh @ W_hh inside the loop, and dW_ih,
dW_hh, the bias gradient and dx come after it, as a few large GEMMs over the stacked (T*B, 4H)
gate gradients. No autograd node per step.

Gates are i, f, g, o as in PyTorch, permuted into the kernel's blocked order (each thread's units'
four gates adjacent) by indexing the weights before the call, so autograd permutes their gradients
back. The float64 path is the same code with libm activations, for gradcheck.

Higher-order gradients: the kernel's backward is a numpy routine, so autograd cannot differentiate
it. Where a backward must itself be differentiable (create_graph=True: a gradient penalty, a
Hessian-vector product, MAML) or runs under vmap (batched gradients, `is_grads_batched`), the node
recomputes its forward in plain torch ops from the inputs it saved (cell.recur) and differentiates
that instead: torch's exact answer at every order, at the autograd path's cost for that call only.
Under torch.func transforms and forward-mode AD the layer takes the autograd path from the start
(`available` says no), since a numpy forward cannot see their wrapped tensors.
"""
from __future__ import annotations

import ctypes
import functools
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import native
from .cell import recur, step_mask


def aligned_empty(shape, dtype) -> np.ndarray:
    """np.empty on a 64-byte boundary. numpy guarantees 16 bytes: a 64-byte vector load from such an
    array can straddle two cache lines, and where it does depends on each allocation's offset."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(n * dtype.itemsize + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + n * dtype.itemsize].view(dtype).reshape(shape)


class _Workspace:
    """Scratch arrays kept from one call to the next of the same shapes, as torch's CUDA allocator
    keeps blocks: a fresh multi-MB array costs its page faults and zeroing on first touch, which
    measured 1.10-1.35x the step time of T128 B64 H512 on a 2-core VM once other allocations had
    moved the heap. Holds at most `limit` bytes (least recently returned dropped first); arrays go
    back only when no tensor can still see them (the records after backward, scratch at once)."""

    def __init__(self, limit: int = 1 << 30):
        self.limit, self.free, self.lock = limit, [], threading.Lock()

    def take(self, shape, dtype) -> np.ndarray:
        with self.lock:
            for k, a in enumerate(self.free):
                if a.shape == tuple(shape) and a.dtype == dtype:
                    return self.free.pop(k)
        return aligned_empty(shape, dtype)

    def give(self, *arrays) -> None:
        with self.lock:
            self.free.extend(a for a in arrays if a is not None)
            while sum(a.nbytes for a in self.free) > self.limit:
                self.free.pop(0)


_WORKSPACE = _Workspace()
# OpenBLAS's thread count is process-wide in its pthread builds: while one kernel call has it at 1,
# another must not restore it, so the calls take turns (they would compete for the cores anyway).
_KERNEL_LOCK = threading.Lock()


@dataclass(frozen=True)
class LayerPlan:
    """How a layer of `hidden` units is split over threads: thread k owns units split[k]:split[k+1]
    (multiples of the kernel's panel width, so no packed panel straddles two threads)."""

    hidden: int
    split: tuple[int, ...]

    @property
    def threads(self) -> int:
        return len(self.split) - 1

    @functools.cached_property
    def order(self) -> Tensor:
        """The 4H gate rows in blocked order: per thread, its units' i, f, g, o."""
        H = self.hidden
        return torch.tensor([q * H + j for a, b in zip(self.split, self.split[1:]) for q in range(4)
                             for j in range(a, b)], dtype=torch.long)


@functools.lru_cache(maxsize=64)
def plan_for(hidden: int, threads: int, panel: int) -> LayerPlan:
    """Up to `threads` threads, each with at least one panel of units."""
    threads = max(1, min(threads, hidden // panel))
    per = -(-hidden // threads)
    per = -(-per // panel) * panel
    cuts = [min(hidden, k * per) for k in range(threads)] + [hidden]
    return LayerPlan(hidden, tuple(sorted(set(cuts))))


def available(x: Tensor, *weights: Tensor | None) -> bool:
    """Whether the native kernel can run this layer: CPU, float32 or float64, one dtype, a kernel,
    and plain tensors (no torch.func transform or forward-mode AD in play, see the module doc)."""
    ts = [x, *(w for w in weights if w is not None)]
    return (all(t.device.type == "cpu" and t.dtype == x.dtype for t in ts)
            and x.dtype in (torch.float32, torch.float64) and not _transformed(ts)
            and native.kernel() is not None)


def _transformed(ts) -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, jvp, ...) is active or any tensor carries
    a forward-mode tangent: the numpy kernel would read the bare values and drop the rest."""
    if torch._C._are_functorch_transforms_active():
        return True
    if fwAD._current_level < 0:  # no dual level entered: no tensor can have a tangent
        return False
    return any(fwAD.unpack_dual(t).tangent is not None for t in ts)


def _wrapped(*ts: Tensor | None) -> bool:
    """Whether a gradient arrives batched: torch.autograd.grad(is_grads_batched=True) (and so
    gradcheck's check_batched_grad) vmaps the backward with the legacy batched tensors, which the
    functorch wrapper check does not see."""
    fc = torch._C._functorch
    return any(t is not None and (fc.is_legacy_batchedtensor(t) or fc.is_functorch_wrapped_tensor(t)) for t in ts)


def lstm_layer(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
               h0: Tensor, c0: Tensor, lengths: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One direction of one layer: x (T, B, I), weights as torch's, h0/c0 (B, H), lengths (B,) int
    or None -> y (T, B, H) (zeros past each length), h_n, c_n (B, H) (at each sequence's end)."""
    kern = native.kernel()
    H = w_hh.shape[1]
    plan = plan_for(H, torch.get_num_threads() if kern.threads_ok else 1, kern.panel)
    order = plan.order
    b = b_ih + b_hh if b_ih is not None else x.new_zeros(4 * H)
    lens = None if lengths is None else np.ascontiguousarray(lengths.cpu().numpy(), dtype=np.int64)
    record = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                             for t in (x, w_ih, w_hh, b_ih, b_hh, h0, c0))
    return _LSTMLayer.apply(x, w_ih[order], w_hh[order], b[order], h0, c0, lens, reverse, plan, record)


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _suffix(dtype) -> str:
    return "f32" if dtype == np.float32 else "f64"


def _gemm(kern, ta: int, tb: int, A: np.ndarray, B: np.ndarray, C: np.ndarray, beta: float, threads: int):
    """C = beta C + op(A) @ op(B) on 2-D C-contiguous arrays, split over `threads` threads."""
    M, N = C.shape
    K = A.shape[0] if ta else A.shape[1]
    getattr(kern.lib, f"parallel_gemm_{_suffix(C.dtype)}")(
        ctypes.byref(kern.blas), threads, ta, tb, M, N, K, _ptr(A), A.shape[1], _ptr(B), B.shape[1], beta, _ptr(C), N)
    return C


def _matmul(kern, A: np.ndarray, B: np.ndarray, threads: int, C: np.ndarray | None = None) -> np.ndarray:
    """A (M, K) @ B (K, N) into C: float32 on the packed micro-kernel (B packed once, reused by
    every row tile), float64 through the BLAS."""
    M, N = A.shape[0], B.shape[1]
    C = aligned_empty((M, N), A.dtype) if C is None else C
    if A.dtype != np.float32:
        return _gemm(kern, 0, 0, A, np.ascontiguousarray(B), C, 0.0, threads)
    packed = _weights_for_loop(kern, B)
    kern.lib.parallel_packed_gemm(threads, M, N, A.shape[1], _ptr(A), A.shape[1], _ptr(packed), _ptr(C), N)
    return C


def _weights_for_loop(kern, w: np.ndarray) -> np.ndarray:
    """float32: w (K, N) packed in the micro-kernel's panels; float64: w as it is (the BLAS reads it)."""
    if w.dtype != np.float32:
        return np.ascontiguousarray(w)
    K, N = w.shape
    w = np.ascontiguousarray(w)
    packed = aligned_empty(-(-N // kern.panel) * kern.panel * K, np.float32)
    kern.lib.pack_panels(K, N, _ptr(w), N, _ptr(packed))
    return packed


class _LSTMLayer(torch.autograd.Function):
    """(x, W_ih, W_hh, b in blocked order, h0, c0) -> (y, h_n, c_n); see lstm_layer."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b, h0, c0, lens, reverse, plan, record):
        kern = native.kernel()
        T, B, I = x.shape
        H = plan.hidden
        xs = np.ascontiguousarray(x.detach().numpy())
        wi = np.ascontiguousarray(w_ih.detach().numpy())
        wh = np.ascontiguousarray(w_hh.detach().numpy())
        dt = xs.dtype
        bias = np.ascontiguousarray(b.detach().numpy())
        with _KERNEL_LOCK:
            # every step's projection (the cell adds the bias), then its activated gates
            G = _matmul(kern, xs.reshape(T * B, I), wi.T, plan.threads, _WORKSPACE.take((T * B, 4 * H), dt))
            h = np.array(h0.detach().numpy(), dt, copy=True, order="C")
            c = np.array(c0.detach().numpy(), dt, copy=True, order="C")
            y, tc, hbuf = aligned_empty((T, B, H), dt), _WORKSPACE.take((T, B, H), dt), aligned_empty((2, B, H), dt)
            hp = _WORKSPACE.take((T, B, H), dt) if record else None
            cp = _WORKSPACE.take((T, B, H), dt) if record else None
            split = np.asarray(plan.split, np.int64)
            w_loop = _weights_for_loop(kern, wh.T)  # held here: the kernel only gets its address
            getattr(kern.lib, f"lstm_forward_{_suffix(dt)}")(
                ctypes.byref(kern.blas), plan.threads, _ptr(split), T, B, H, _ptr(lens), int(reverse), _ptr(G),
                _ptr(bias), _ptr(w_loop), _ptr(h), _ptr(c), _ptr(hbuf), _ptr(y), _ptr(tc), _ptr(hp),
                _ptr(cp))
        if record:
            ctx.saved = (xs, wi, wh, G.reshape(T, B, 4 * H), hp, cp, tc, lens, reverse, plan)
            ctx.save_for_backward(x, w_ih, w_hh, b, h0, c0)  # for a differentiable backward
            # the records go back when the graph lets go of them (after backward, or never run),
            # so that backward(retain_graph=True) may run again
            weakref.finalize(ctx, _WORKSPACE.give, G, hp, cp, tc)
        else:
            _WORKSPACE.give(G, tc)
        return torch.from_numpy(y), torch.from_numpy(h), torch.from_numpy(c)

    @staticmethod
    def backward(ctx, dy, dh, dc):
        # grad mode is on in a backward exactly when the caller asked for create_graph=True
        if torch.is_grad_enabled() or _wrapped(dy, dh, dc):
            return _recomputed_backward(ctx, dy, dh, dc)
        return _native_backward(ctx, dy, dh, dc)


def _recomputed_backward(ctx, dy, dh, dc):
    """The node's gradients from its forward recomputed in torch ops (cell.recur) from the saved
    inputs, which still carry their own history: the result is differentiable to any order and
    batches under vmap. Inputs in blocked gate order are permuted back to PyTorch's i, f, g, o."""
    _, _, _, _, _, _, _, lens, reverse, plan = ctx.saved
    create_graph = torch.is_grad_enabled()
    inputs = ctx.saved_tensors  # x, W_ih, W_hh, b (blocked order), h0, c0
    wanted = [k for k, need in enumerate(ctx.needs_input_grad[:6]) if need]
    with torch.enable_grad():
        ins = [t if k not in wanted or t.requires_grad else t.detach().requires_grad_()
               for k, t in enumerate(inputs)]
        x, w_ih, w_hh, b, h0, c0 = ins
        back = torch.argsort(plan.order)  # blocked row -> PyTorch row
        xw = x @ w_ih[back].t() + b[back]  # (T, B, 4H)
        mask = None if lens is None else step_mask(x.shape[0], torch.from_numpy(lens))  # (T, B, 1)
        y, (h, c) = recur(xw, w_hh[back], h0, c0, mask, reverse)
        grads = torch.autograd.grad((y, h, c), [ins[k] for k in wanted], (dy, dh, dc),
                                    create_graph=create_graph, allow_unused=True)
    out = [None] * 10
    for k, g in zip(wanted, grads):
        out[k] = g
    return tuple(out)


def _native_backward(ctx, dy, dh, dc):
    """The kernel's backward: one loop of dh @ W_hh, then the weight gradients as large GEMMs."""
    kern = native.kernel()
    xs, wi, wh, G, hp, cp, tc, lens, reverse, plan = ctx.saved
    T, B, H4 = G.shape
    H, I, dt = H4 // 4, xs.shape[2], G.dtype
    need_x, need_wi, need_wh, need_b, need_h0, need_c0 = ctx.needs_input_grad[:6]
    with _KERNEL_LOCK:
        dys = np.ascontiguousarray(dy.numpy(), dt) if dy is not None else np.zeros((T, B, H), dt)
        dhs = np.array(dh.numpy(), dt, copy=True, order="C") if dh is not None else np.zeros((B, H), dt)
        dcs = np.array(dc.numpy(), dt, copy=True, order="C") if dc is not None else np.zeros((B, H), dt)
        dG, db = _WORKSPACE.take((T, B, H4), dt), np.zeros(H4, dt)
        split = np.asarray(plan.split, np.int64)
        w_loop = _weights_for_loop(kern, wh)
        getattr(kern.lib, f"lstm_backward_{_suffix(dt)}")(
            ctypes.byref(kern.blas), plan.threads, _ptr(split), T, B, H, _ptr(lens), int(reverse), _ptr(G),
            _ptr(cp), _ptr(tc), _ptr(dys), _ptr(w_loop), _ptr(dhs), _ptr(dcs), _ptr(dG),
            _ptr(db))
        dG = dG.reshape(T * B, H4)  # the stacked gate gradients: every weight gradient is one GEMM
        d_wi = _gemm(kern, 1, 0, dG, xs.reshape(T * B, I), np.empty((H4, I), dt), 0.0, plan.threads) \
            if need_wi else None
        d_wh = _gemm(kern, 1, 0, dG, hp.reshape(T * B, H), np.empty((H4, H), dt), 0.0, plan.threads) \
            if need_wh else None
        d_x = _matmul(kern, dG, wi, plan.threads).reshape(T, B, I) if need_x else None
    _WORKSPACE.give(dG.reshape(T, B, H4))
    as_t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    d_b = torch.from_numpy(db) if need_b else None
    return (as_t(d_x), as_t(d_wi), as_t(d_wh), d_b, as_t(dhs) if need_h0 else None,
            as_t(dcs) if need_c0 else None, None, None, None, None)
