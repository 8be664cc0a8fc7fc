"""The float64 numpy reference, checked against torch.nn.LSTM, then used as the LayerNormLSTM oracle."""
import itertools

import numpy as np
import pytest
import torch

from lstm_export import LayerNormLSTM
from lstm_export.reference import lstm_sequence

I, H, T, B = 4, 6, 5, 3


def _np_state(m):
    return {k: v.detach().double().numpy() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("num_layers,bidirectional,bias", list(itertools.product([1, 2], [False, True], [True, False])))
def test_reference_matches_torch_float64(num_layers, bidirectional, bias):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, num_layers, bias=bias, bidirectional=bidirectional).double()
    D = 2 if bidirectional else 1
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(num_layers * D, B, H, dtype=torch.float64)
    c0 = torch.randn(num_layers * D, B, H, dtype=torch.float64)
    y, (h, c) = ref(x, (h0, c0))
    o, hn, cn = lstm_sequence(_np_state(ref), x.numpy(), num_layers, bidirectional, h0.numpy(), c0.numpy())
    np.testing.assert_allclose(o, y.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(hn, h.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(cn, c.detach().numpy(), atol=1e-12)


def test_reference_lengths_match_torch_packed():
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, 2, bidirectional=True).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    lengths = [3, 5, 1]
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    y, (h, c) = ref(packed)
    y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, total_length=T)
    o, hn, cn = lstm_sequence(_np_state(ref), x.numpy(), 2, True, lengths=lengths)
    np.testing.assert_allclose(o, y.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(hn, h.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(cn, c.detach().numpy(), atol=1e-12)


def _ln_model(num_layers=2, bidirectional=False, batch_first=False, dtype=torch.float32):
    torch.manual_seed(0)
    m = LayerNormLSTM(I, H, num_layers, bidirectional=bidirectional, batch_first=batch_first)
    with torch.no_grad():  # non-trivial gains and shifts, so their wiring is tested too
        for n, p in m.named_parameters():
            if n.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype)


LN_GRID = list(itertools.product([1, 2], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("num_layers,bidirectional,batch_first,with_lengths", LN_GRID)
def test_layernorm_lstm_matches_reference(num_layers, bidirectional, batch_first, with_lengths):
    m = _ln_model(num_layers, bidirectional, batch_first)
    D = 2 if bidirectional else 1
    x = torch.randn(B, T, I) if batch_first else torch.randn(T, B, I)
    hx = (torch.randn(num_layers * D, B, H), torch.randn(num_layers * D, B, H))
    lengths = torch.tensor([3, 5, 2]) if with_lengths else None
    y, (h, c) = m(x, hx, lengths=lengths)
    xt = x.transpose(0, 1) if batch_first else x
    o, hn, cn = lstm_sequence(_np_state(m), xt.numpy(), num_layers, bidirectional, hx[0].numpy(), hx[1].numpy(),
                              lengths=lengths, layernorm={"eps": m.eps, "forget_bias": m.forget_bias})
    yt = y.transpose(0, 1) if batch_first else y
    np.testing.assert_allclose(yt.detach().numpy(), o, atol=1e-5)
    np.testing.assert_allclose(h.detach().numpy(), hn, atol=1e-5)
    np.testing.assert_allclose(c.detach().numpy(), cn, atol=1e-5)


def test_layernorm_lstm_gradients_numerically():
    """Autograd gradients against finite differences, in float64 on a tiny shape."""
    m = _ln_model(num_layers=2, bidirectional=True, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        y, (h, c) = torch.func.functional_call(m, dict(zip(names, ps)), (x,))
        return y.sum() + h.square().sum() + c.sum()

    ps = [p.detach().clone().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(f, (x, *ps), eps=1e-6, atol=1e-6, fast_mode=True)
