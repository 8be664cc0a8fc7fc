"""The native kernel's layer (lstm_export/fused.py) against plain autograd of the reference cell
(our model's autograd path, whose per-step math test_model checks against torch.nn.LSTM) and
against torch.autograd.gradcheck in float64, for every configuration the drop-in supports."""
import itertools
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from lstm_export import LSTM, LayerNormLSTM, fused, native
from tests.marks import one_fast

pytestmark = pytest.mark.skipif(native.kernel() is None,
                                reason=f"no native LSTM kernel here: {native.unavailable_reason()}")
RTOL = 1e-5  # fp32, relative to the largest magnitude of each gradient


def _pair(I, H, **kw):
    """The same weights twice: one model on the native kernel, one on the autograd path."""
    torch.manual_seed(0)
    native_m = LSTM(I, H, **kw)
    plain = LSTM(I, H, **kw)
    plain.load_state_dict(native_m.state_dict())
    plain.use_native_kernel = False
    return native_m, plain


def _run(m, x, hx, lengths, packed):
    xi = x.clone().requires_grad_()
    hi = tuple(s.clone().requires_grad_() for s in hx) if hx is not None else None
    if packed:
        y, (h, c) = m(pack_padded_sequence(xi, lengths, batch_first=m.batch_first, enforce_sorted=False), hi)
        y = y.data
    else:
        y, (h, c) = m(xi, hi, lengths=lengths)
    torch.manual_seed(3)  # the same loss weights for both
    w = torch.randn_like(y)
    ((y * w).sum() + h.square().sum() + 0.5 * c.sum()).backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    grads["x"] = xi.grad
    if hi is not None:
        grads["h0"], grads["c0"] = hi[0].grad, hi[1].grad
    return (y, h, c), grads


def _close(a, b, what):
    scale = max(b.abs().max().item(), 1e-6)
    err = (a - b).abs().max().item() / scale
    assert err <= RTOL, f"{what}: relative error {err:.2e} > {RTOL}"


CONFIGS = list(itertools.product([1, 2], [False, True], [False, True], [False, True], [None, "lengths", "packed"]))


@pytest.mark.parametrize("layers,bidirectional,batch_first,with_state,lengths", one_fast(CONFIGS, multi=True))
def test_gradients_equal_plain_autograd(layers, bidirectional, batch_first, with_state, lengths):
    T, B, I, H = 9, 5, 6, 64  # H = 64: two threads of 32 units each where the pool has two
    ours, plain = _pair(I, H, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    torch.manual_seed(1)
    x = torch.randn(B, T, I) if batch_first else torch.randn(T, B, I)
    D = 2 if bidirectional else 1
    hx = (torch.randn(layers * D, B, H), torch.randn(layers * D, B, H)) if with_state else None
    lens = torch.tensor([9, 3, 1, 7, 9]) if lengths else None
    out_a, g_a = _run(ours, x, hx, lens, lengths == "packed")
    out_b, g_b = _run(plain, x, hx, lens, lengths == "packed")
    for what, a, b in zip(("output", "h_n", "c_n"), out_a, out_b):
        _close(a, b, what)
    assert g_a.keys() == g_b.keys()
    for n in g_a:
        _close(g_a[n], g_b[n], f"d {n}")


def test_zero_lengths_emit_zeros_and_a_zero_state():
    """A sequence of 0 steps (ONNX's sequence_lens allows it): zeros out and a zero final state, as
    ONNX Runtime gives; the same numbers and gradients on both paths, in both directions."""
    T, B, I, H = 5, 4, 3, 64
    ours, plain = _pair(I, H, bidirectional=True)
    x = torch.randn(T, B, I)
    hx = (torch.randn(2, B, H), torch.randn(2, B, H))
    lens = torch.tensor([0, 5, 2, 0])
    (y, h, c), g = _run(ours, x, hx, lens, False)
    assert torch.all(y[:, [0, 3]] == 0)
    assert torch.all(h[:, [0, 3]] == 0) and torch.all(c[:, [0, 3]] == 0)
    assert torch.all(g["h0"][:, [0, 3]] == 0)
    (y2, h2, c2), g2 = _run(plain, x, hx, lens, False)
    for n in g:
        _close(g[n], g2[n], f"d {n}")
    with pytest.raises(ValueError, match=r"in \[0, 5\]"):
        ours(x, hx, lengths=torch.tensor([0, 6, 1, 1]))
    with pytest.raises(ValueError, match=r"in \[0, 5\]"):
        ours(x, hx, lengths=torch.tensor([0, -1, 1, 1]))


def test_dropout_between_layers_matches_with_the_same_mask():
    ours, plain = _pair(4, 64, num_layers=3, dropout=0.3)
    x = torch.randn(6, 3, 4)
    outs = []
    for m in (ours, plain):
        torch.manual_seed(7)  # the same dropout masks
        outs.append(_run(m, x, None, None, False))
    for n in outs[0][1]:
        _close(outs[0][1][n], outs[1][1][n], f"d {n} with dropout")


def test_tbptt_carries_the_state_and_cuts_the_graph():
    """Two windows, the state of the first carried into the second and detached: the second
    window's gradients see no step of the first, on both paths."""
    ours, plain = _pair(5, 64, num_layers=2)
    x = torch.randn(12, 4, 5)
    grads = []
    for m in (ours, plain):
        y, state = m(x[:6])
        state = tuple(s.detach() for s in state)
        m.zero_grad()
        y2, _ = m(x[6:], state)
        y2.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        _close(grads[0][n], grads[1][n], f"d {n} of window 2")


CHECKS = [dict(reverse=False, lengths=None), dict(reverse=True, lengths=None),
          dict(reverse=False, lengths=[4, 0, 2]), dict(reverse=True, lengths=[1, 4, 0])]


@pytest.mark.parametrize("case", one_fast(CHECKS))
def test_gradcheck_float64(case):
    torch.manual_seed(0)
    T, B, I, H = 4, 3, 3, 5
    args = [torch.randn(T, B, I), torch.randn(4 * H, I) * 0.5, torch.randn(4 * H, H) * 0.5, torch.randn(4 * H),
            torch.randn(4 * H), torch.randn(B, H), torch.randn(B, H)]
    args = [a.double().requires_grad_() for a in args]
    lens = torch.tensor(case["lengths"]) if case["lengths"] else None

    def f(*a):
        return fused.lstm_layer(*a, lens, case["reverse"])

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


MODEL_CHECKS = [dict(bidirectional=True), dict(batch_first=True, lengths=[3, 0, 2, 3]), dict(dropout=0.4),
                dict(packed=[3, 1, 2, 2])]


@pytest.mark.parametrize("case", one_fast(MODEL_CHECKS))
def test_gradcheck_float64_through_the_model(case):
    """Two layers, an initial state, and one configuration each: bidirectional, batch_first with
    lengths (a zero among them), dropout between the layers (the same mask at every evaluation),
    a PackedSequence."""
    torch.manual_seed(0)
    kw = {k: v for k, v in case.items() if k in ("bidirectional", "batch_first", "dropout")}
    m = LSTM(3, 4, num_layers=2, **kw).double()
    D, B, T = 1 + case.get("bidirectional", False), 4, 3
    x = torch.randn(B, T, 3) if case.get("batch_first") else torch.randn(T, B, 3)
    x = x.double().requires_grad_()
    h0 = torch.randn(2 * D, B, 4, dtype=torch.float64, requires_grad=True)
    w = m.weight_hh_l1.detach().clone().requires_grad_()
    assert m._native(x, m.weight_ih_l0)
    lengths = torch.tensor(case["lengths"]) if "lengths" in case else None

    def f(x, h0, w):
        torch.manual_seed(5)
        del m.weight_hh_l1
        m.weight_hh_l1 = w  # a plain tensor for the call, so gradcheck varies it too
        try:
            if "packed" in case:
                y, (h, c) = m(pack_padded_sequence(x, torch.tensor(case["packed"]), enforce_sorted=False),
                              (h0, torch.zeros_like(h0)))
                return y.data, h, c
            y, (h, c) = m(x, (h0, torch.zeros_like(h0)), lengths=lengths)
            return y, h, c
        finally:
            del m.weight_hh_l1
            m.weight_hh_l1 = torch.nn.Parameter(w.detach())

    assert torch.autograd.gradcheck(f, (x, h0, w), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_float32_multithreaded_split_matches_one_thread(monkeypatch):
    """Units split over two threads (H = 96: 64 + 32) compute what one thread computes."""
    ours, _ = _pair(7, 96, num_layers=1)
    x = torch.randn(10, 6, 7)
    results = []
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        fused.plan_for.cache_clear()
        results.append(_run(ours, x, None, None, False))
    fused.plan_for.cache_clear()
    for n in results[0][1]:
        _close(results[1][1][n], results[0][1][n], f"d {n}, 2 threads vs 1")


def test_plans_split_on_panel_boundaries():
    p = fused.plan_for(100, 2, 32)
    assert p.split == (0, 64, 100) and p.threads == 2
    assert fused.plan_for(48, 4, 32).split == (0, 48)  # fewer units than two panels: one thread
    order = p.order.tolist()
    assert sorted(order) == list(range(400))
    assert order[:3] == [0, 1, 2] and order[64] == 100  # thread 0: i of units 0..63, then its f


def test_concurrent_calls_from_two_threads_agree():
    m, _ = _pair(8, 64)
    x = torch.randn(20, 4, 8)
    with torch.no_grad():
        want = m(x)[0]
    got = [None, None]

    def work(k):
        with torch.no_grad():
            got[k] = m(x)[0]

    ts = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert torch.equal(got[0], want) and torch.equal(got[1], want)


def test_numpy_keeps_its_blas_threads():
    """The kernel makes the BLAS single-threaded only while it runs."""
    import ctypes
    lib = ctypes.CDLL(native.kernel().blas_path)
    get = getattr(lib, "scipy_openblas_get_num_threads64_", None) or getattr(lib, "openblas_get_num_threads", None)
    if get is None:
        pytest.skip("the BLAS numpy loaded is not OpenBLAS")
    before = get()
    m, _ = _pair(8, 64)
    y, _ = m(torch.randn(5, 3, 8, requires_grad=True))
    y.sum().backward()
    assert get() == before


def test_layernorm_lstm_keeps_plain_autograd():
    m = LayerNormLSTM(4, 64)
    assert not m._native(torch.randn(2, 1, 4), m.weight_ih_l0)
    m = LSTM(4, 64)
    assert m._native(torch.randn(2, 1, 4), m.weight_ih_l0)
    assert not m._native(torch.randn(2, 1, 4).to(torch.bfloat16), m.weight_ih_l0)  # other dtypes: autograd


def test_without_a_compiler_the_autograd_path_runs(tmp_path):
    """No C compiler: the kernel is unavailable with the reason named, and LSTM still matches
    torch.nn.LSTM (through its autograd path)."""
    code = ("import torch; from lstm_export import native, LSTM\n"
            "assert native.kernel() is None; print(native.unavailable_reason())\n"
            "torch.manual_seed(0); ref = torch.nn.LSTM(3, 8); m = LSTM(3, 8); m.load_state_dict(ref.state_dict())\n"
            "x = torch.randn(4, 2, 3); assert (m(x)[0] - ref(x)[0]).abs().max() < 1e-5\n")
    env = {"PATH": "/nonexistent", "CC": "/nonexistent/cc", "XDG_CACHE_HOME": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "does not run" in done.stdout or "no C compiler" in done.stdout


def test_the_kernel_is_built_once_per_machine(tmp_path):
    code = "from lstm_export import native; k = native.kernel(); print(k.lib._name)"
    env = {"PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    built = list((tmp_path / "lstm-export" / "native").glob("*.so"))
    assert len(built) == 1 and first.stdout.strip() == str(built[0])
    mtime = built[0].stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert second.stdout == first.stdout and built[0].stat().st_mtime_ns == mtime


def test_activations_hold_at_the_extremes():
    """Saturated gates and large cell states: finite, and equal to the autograd path."""
    ours, plain = _pair(3, 64)
    with torch.no_grad():
        for m in (ours, plain):
            m.weight_ih_l0.mul_(400)
    x = torch.randn(6, 2, 3) * 3
    (y, h, c), g = _run(ours, x, None, None, False)
    (y2, h2, c2), g2 = _run(plain, x, None, None, False)
    assert torch.isfinite(y).all() and torch.isfinite(c).all()
    _close(y, y2, "saturated output")
    _close(c, c2, "saturated c")
    assert np.isfinite(g["weight_ih_l0"].numpy()).all()
