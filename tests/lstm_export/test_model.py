"""The from-scratch LSTM family against torch.nn.LSTM / LSTMCell (outputs and gradients)."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from lstm_export import LSTM, LSTMCell, UserError

ATOL = 1e-5
I, H, T, B = 5, 7, 6, 3


def _pair(**kw):
    """Our LSTM and a torch.nn.LSTM sharing the same weights."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, **kw)
    ours = LSTM(I, H, **kw)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _assert_close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    err = (a - b).abs().max().item()
    assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL}"


GRID = list(itertools.product([1, 2], [True, False], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("num_layers,bias,batch_first,bidirectional,with_state", GRID)
def test_matches_torch_outputs_and_gradients(num_layers, bias, batch_first, bidirectional, with_state):
    ours, ref = _pair(num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    D = 2 if bidirectional else 1
    x = torch.randn(B, T, I) if batch_first else torch.randn(T, B, I)
    hx = (torch.randn(num_layers * D, B, H), torch.randn(num_layers * D, B, H)) if with_state else None
    outs = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        hi = tuple(s.clone().requires_grad_() for s in hx) if hx else None
        y, (h, c) = m(xi, hi)
        (y.square().sum() + h.sum() + 2 * c.sum()).backward()
        outs.append((y, h, c, xi.grad, hi[0].grad if hi else None, _grads(m)))
    (y1, h1, c1, gx1, gh1, gp1), (y2, h2, c2, gx2, gh2, gp2) = outs
    _assert_close(y1, y2, "output")
    _assert_close(h1, h2, "h_n")
    _assert_close(c1, c2, "c_n")
    _assert_close(gx1, gx2, "d input")
    if with_state:
        _assert_close(gh1, gh2, "d h_0")
    assert gp1.keys() == gp2.keys()
    for n in gp1:
        _assert_close(gp1[n], gp2[n], f"d {n}")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_unbatched_input(bidirectional):
    ours, ref = _pair(num_layers=2, bidirectional=bidirectional)
    x = torch.randn(T, I)
    hx = (torch.randn(2 * (1 + bidirectional), H), torch.randn(2 * (1 + bidirectional), H))
    for a, b in zip(ours(x, hx), ref(x, hx)):
        a, b = (a, b) if isinstance(a, torch.Tensor) else (torch.stack(a), torch.stack(b))
        _assert_close(a, b, "unbatched")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_streaming_two_chunks_equal_one_call(bidirectional):
    """Feeding the state back between two chunks is the same as one long call (unidirectional only
    makes sense for streaming; bidirectional is checked against torch doing the same)."""
    ours, ref = _pair(num_layers=2, bidirectional=bidirectional)
    x = torch.randn(T, B, I)
    y1, s1 = ours(x[:2])
    y2, s2 = ours(x[2:], s1)
    r1, q1 = ref(x[:2])
    r2, q2 = ref(x[2:], q1)
    _assert_close(torch.cat([y1, y2]), torch.cat([r1, r2]), "streamed output")
    _assert_close(s2[0], q2[0], "streamed h")
    if not bidirectional:
        y_full, s_full = ours(x)
        _assert_close(torch.cat([y1, y2]), y_full, "streamed vs one call")
        _assert_close(s2[1], s_full[1], "streamed c vs one call")


@pytest.mark.parametrize("num_layers,bidirectional,batch_first",
                         list(itertools.product([1, 2], [False, True], [False, True])))
def test_packed_and_lengths_match_torch_packed(num_layers, bidirectional, batch_first):
    ours, ref = _pair(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
    lengths = torch.tensor([4, 6, 1])  # unsorted on purpose
    x = torch.randn(B, T, I) if batch_first else torch.randn(T, B, I)
    D = 2 if bidirectional else 1
    hx = (torch.randn(num_layers * D, B, H), torch.randn(num_layers * D, B, H))
    res = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        packed = pack_padded_sequence(xi, lengths, batch_first=batch_first, enforce_sorted=False)
        y, (h, c) = m(packed, hx)
        (y.data.square().sum() + h.sum() + c.sum()).backward()
        res.append((y, h, c, xi.grad, _grads(m)))
    (y1, h1, c1, g1, p1), (y2, h2, c2, g2, p2) = res
    assert torch.equal(y1.batch_sizes, y2.batch_sizes)
    assert torch.equal(y1.sorted_indices, y2.sorted_indices)
    _assert_close(y1.data, y2.data, "packed output")
    _assert_close(h1, h2, "h_n = last valid step")
    _assert_close(c1, c2, "c_n")
    _assert_close(g1, g2, "d input")
    for n in p1:
        _assert_close(p1[n], p2[n], f"d {n}")

    # lengths= on the padded tensor gives the same numbers, with zeros on padded steps
    y3, (h3, c3) = ours(x, hx, lengths=lengths)
    y_ref, _ = torch.nn.utils.rnn.pad_packed_sequence(y2, batch_first=batch_first, total_length=T)
    _assert_close(y3, y_ref.detach(), "lengths= output (padded with zeros)")
    _assert_close(h3, h2.detach(), "lengths= h_n")


def test_dropout_between_layers():
    ours, ref = _pair(num_layers=2, dropout=0.5)
    x = torch.randn(T, B, I)
    ours.eval(), ref.eval()
    _assert_close(ours(x)[0], ref(x)[0], "eval mode ignores dropout")
    ours.train()
    torch.manual_seed(1)
    y_a = ours(x)[0]
    torch.manual_seed(2)
    y_b = ours(x)[0]
    assert (y_a - y_b).abs().max() > 1e-3, "dropout in training mode must perturb the second layer"


def test_state_dict_round_trips_both_ways():
    ours, ref = _pair(num_layers=2, bidirectional=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    fresh = torch.nn.LSTM(I, H, 2, bidirectional=True)
    fresh.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, I)
    _assert_close(fresh(x)[0], ours(x)[0], "torch loaded from ours")


def test_default_init_bounds_like_torch():
    m = LSTM(I, 64)
    bound = 1 / 64 ** 0.5
    for p in m.parameters():
        assert p.abs().max() <= bound and p.std() > bound / 3


def test_proj_size_refused():
    with pytest.raises(UserError, match="proj_size"):
        LSTM(I, H, proj_size=3)


def test_bad_shapes_named():
    m = LSTM(I, H)
    with pytest.raises(ValueError, match="input.size"):
        m(torch.randn(T, B, I + 1))
    with pytest.raises(ValueError, match="hidden states of shape"):
        m(torch.randn(T, B, I), (torch.zeros(1, B + 1, H), torch.zeros(1, B + 1, H)))


@pytest.mark.parametrize("bias,batched", list(itertools.product([True, False], [True, False])))
def test_cell_matches_torch(bias, batched):
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(I, H, bias=bias)
    ours = LSTMCell(I, H, bias=bias)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, I) if batched else torch.randn(I)
    hx = (torch.randn(B, H), torch.randn(B, H)) if batched else (torch.randn(H), torch.randn(H))
    outs = []
    for m in (ours, ref):
        m.zero_grad()
        h, c = m(x, hx)
        (h.sum() + c.square().sum()).backward()
        outs.append((h, c, _grads(m)))
    _assert_close(outs[0][0], outs[1][0], "cell h")
    _assert_close(outs[0][1], outs[1][1], "cell c")
    for n in outs[0][2]:
        _assert_close(outs[0][2][n], outs[1][2][n], f"cell d {n}")
    _assert_close(ours(x)[0], ref(x)[0], "cell zero state")
