"""Derivatives of every order through the drop-in, on the native kernel: torch's own gradcheck and
gradgradcheck (with batched gradients) in float64 on every configuration the drop-in accepts, and
second derivatives, torch.func transforms and forward-mode AD against torch.nn.LSTM with the same
weights. The kernel's backward is numpy; these hold the recomputed differentiable backward
(fused._recomputed_backward) and the autograd path under transforms to torch's answer."""
import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

from lstm_export import LSTM, LayerNormLSTM, fused, native
from lstm_export.charlm import CharLM
from lstm_export.config import ModelConfig
from tests.marks import one_fast

# functorch scripts helpers with torch.jit on first use; its deprecation is torch's, not ours
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
needs_kernel = pytest.mark.skipif(native.kernel() is None,
                                  reason=f"no native LSTM kernel here: {native.unavailable_reason()}")
T, B, I, H = 3, 2, 2, 3  # small: gradgradcheck differentiates the backward numerically per element


def _inputs(m, kind, seed=1):
    """x, (h0, c0) or None, lengths or None for model `m` and a lengths kind."""
    g = torch.Generator().manual_seed(seed)
    D = m.num_directions
    x = torch.randn((B, T, I) if m.batch_first else (T, B, I), generator=g, dtype=torch.float64)
    hx = (torch.randn(m.num_layers * D, B, H, generator=g, dtype=torch.float64),
          torch.randn(m.num_layers * D, B, H, generator=g, dtype=torch.float64))
    lengths = {None: None, "lengths": torch.tensor([3, 0]), "packed": torch.tensor([1, 3])}[kind]
    return x, hx, lengths


def _as_function(m, kind, with_state):
    """(x, h0, c0, *parameters) -> every output of m, for gradcheck: every parameter is an input."""
    names = [n for n, _ in m.named_parameters()]

    def f(x, h0, c0, *params):
        p = dict(zip(names, params))
        hx = (h0, c0) if with_state else None
        if kind == "packed":
            seq = pack_padded_sequence(x, lengths, batch_first=m.batch_first, enforce_sorted=False)
            y, (h, c) = functional_call(m, p, (seq, hx))
            return y.data, h, c
        y, (h, c) = functional_call(m, p, (x, hx), {"lengths": lengths})
        return y, h, c

    x, hx, lengths = _inputs(m, kind)
    args = (x, *hx, *(p.detach() for p in m.parameters()))
    return f, tuple(a.clone().requires_grad_() for a in args)


AXES = ("layers", "bidirectional", "batch_first", "bias", "lengths", "state")
# Each value of every axis, and every pair of values of two axes in some case (a covering array:
# the full product's 96 cases would take CI minutes for no pair they add).
CONFIGS = [dict(zip(AXES, c)) for c in [
    (1, False, False, True, None, True), (1, True, True, False, "lengths", False),
    (1, False, True, True, "packed", True), (1, True, False, True, "packed", False),
    (1, False, False, False, "lengths", True), (1, True, True, True, None, True),
    (2, False, False, True, "lengths", True), (2, True, False, True, None, True),
    (2, True, True, True, "lengths", True), (2, False, True, False, "packed", False),
    (2, True, False, False, "packed", True), (2, False, False, True, None, False),
    (2, True, True, False, None, False), (1, False, True, False, None, False),
]]


@needs_kernel
@pytest.mark.parametrize("case", one_fast(CONFIGS), ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gradcheck_and_gradgradcheck_with_batched_grads(case):
    """Full Jacobians for one layer; two layers in gradcheck's fast mode (the Jacobians projected on
    random vectors on both sides, which any wrong entry changes), 12x cheaper there."""
    torch.manual_seed(0)
    m = LSTM(I, H, num_layers=case["layers"], bidirectional=case["bidirectional"], batch_first=case["batch_first"],
             bias=case["bias"], dropout=0.5 if case["layers"] > 1 else 0.0).double().eval()  # dropout in eval
    f, args = _as_function(m, case["lengths"], case["state"])
    assert m._native(args[0], m.weight_ih_l0), "the native kernel must be the path under test"
    fast = case["layers"] > 1
    assert torch.autograd.gradcheck(f, args, check_batched_grad=True, fast_mode=fast)
    assert torch.autograd.gradgradcheck(f, args, check_batched_grad=True, fast_mode=fast)


@pytest.mark.parametrize("cls", [LayerNormLSTM, LSTM], ids=["layernorm", "lstm-autograd-path"])
def test_the_autograd_paths_pass_the_same_checks(cls):
    torch.manual_seed(0)
    m = cls(I, H, num_layers=2, bidirectional=True).double()
    m.use_native_kernel = False
    f, args = _as_function(m, "lengths", True)
    assert torch.autograd.gradcheck(f, args, check_batched_grad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, args, check_batched_grad=True, fast_mode=True)


@needs_kernel
def test_charlm_gradgradcheck():
    torch.manual_seed(0)
    m = CharLM(ModelConfig(vocab_size=5, embed=2, hidden=H, layers=2, dropout=0.0)).double()
    idx = torch.tensor([[0, 3, 4], [2, 2, 1]])
    names = [n for n, _ in m.named_parameters()]

    def f(*params):
        logits, (h, c) = functional_call(m, dict(zip(names, params)), (idx,))
        return logits, h, c

    args = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    assert m.lstm._native(m.embed(idx), m.lstm.weight_ih_l0)
    assert torch.autograd.gradgradcheck(f, args, check_batched_grad=True)


def _twin(**kw):
    """Our drop-in on the kernel and torch.nn.LSTM with the same float64 weights."""
    torch.manual_seed(0)
    ours = LSTM(I, H, **kw).double()
    ref = torch.nn.LSTM(I, H, **kw).double()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@needs_kernel
@pytest.mark.parametrize("kw", [dict(num_layers=2), dict(bidirectional=True, batch_first=True)], ids=["L2", "bi-bf"])
def test_second_derivatives_equal_torch_nn_lstm(kw):
    """A gradient penalty's gradient and a Hessian-vector product, the numbers MAML and WGAN-GP
    train on, are torch.nn.LSTM's."""
    ours, ref = _twin(**kw)
    x0 = torch.randn((B, T, I) if ours.batch_first else (T, B, I), dtype=torch.float64)
    v = torch.randn_like(x0)
    results = []
    for m in (ours, ref):
        x = x0.clone().requires_grad_()
        y, (h, c) = m(x)
        loss = (y.tanh() * 1.7).sum() + h.square().sum() + c.sin().sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        penalty = gx.square().sum()  # gradient penalty
        m.zero_grad()
        penalty.backward(retain_graph=True)
        (hvp,) = torch.autograd.grad(gx, x, v)  # Hessian of loss times v
        results.append([gx, hvp] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@needs_kernel
def test_torch_func_transforms_equal_torch_nn_lstm():
    """vmap, grad, jacrev and jvp over functional_call: our call takes the autograd path under a
    transform and gives torch.nn.LSTM's numbers. torch.nn.LSTM has no vmap batching rule
    (aten::lstm), so its side of each vmap is a loop over the batch, and of jacrev autograd's
    jacobian."""
    ours, ref = _twin(num_layers=2)
    params = {n: p.detach() for n, p in ours.named_parameters()}
    xs = torch.randn(4, T, B, I, dtype=torch.float64)  # a batch of inputs for vmap

    def out(m, p, x):
        return functional_call(m, p, (x,))[0]

    def loss(m, p, x):
        return out(m, p, x).square().sum()

    loop = lambda f: torch.stack([f(x) for x in xs])  # noqa: E731
    cases = {
        "vmap": (lambda: torch.func.vmap(lambda x: out(ours, params, x))(xs),
                 lambda: loop(lambda x: out(ref, params, x))),
        "grad": (lambda: torch.func.grad(lambda p: loss(ours, p, xs[0]))(params),
                 lambda: torch.func.grad(lambda p: loss(ref, p, xs[0]))(params)),
        "jacrev": (lambda: torch.func.jacrev(lambda x: out(ours, params, x))(xs[0]),
                   lambda: torch.autograd.functional.jacobian(lambda x: out(ref, params, x), xs[0])),
        "jvp": (lambda: torch.func.jvp(lambda x: out(ours, params, x), (xs[0],), (xs[1],)),
                lambda: torch.func.jvp(lambda x: out(ref, params, x), (xs[0],), (xs[1],))),
        "vmap(grad)": (lambda: torch.func.vmap(torch.func.grad(lambda x: loss(ours, params, x)))(xs),
                       lambda: loop(torch.func.grad(lambda x: loss(ref, params, x)))),
    }
    for name, (got, want) in cases.items():
        torch.testing.assert_close(got(), want(), rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


@needs_kernel
def test_forward_mode_ad_equals_torch_nn_lstm():
    import torch.autograd.forward_ad as fwAD
    ours, ref = _twin()
    x, t = torch.randn(T, B, I, dtype=torch.float64), torch.randn(T, B, I, dtype=torch.float64)
    tangents = []
    for m in (ours, ref):
        with fwAD.dual_level():
            y, _ = m(fwAD.make_dual(x, t))
            tangents.append(fwAD.unpack_dual(y).tangent)
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-9, atol=1e-11)


@needs_kernel
def test_first_order_backward_stays_on_the_kernel(monkeypatch):
    """The recompute is for create_graph and batched grads only: a plain backward runs the kernel's,
    and a create_graph backward the recomputed one."""
    calls = []
    for name in ("_native_backward", "_recomputed_backward"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    m = LSTM(I, H).double()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    m(x)[0].sum().backward()
    assert calls == ["_native_backward"]
    torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)
    assert calls == ["_native_backward", "_recomputed_backward"]
