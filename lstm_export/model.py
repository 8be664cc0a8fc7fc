"""From-scratch LSTM family: drop-in replacements for torch.nn.LSTMCell / torch.nn.LSTM.

Parameter names, shapes, initialisation and gate order (i, f, g, o) follow PyTorch, so
`load_state_dict` works in both directions with `torch.nn.LSTM` and it serves as a free oracle.
The input projection for all time steps is one matrix product; only the recurrent product
h @ W_hh^T stays inside the time loop, and the four gates come out of one fused matmul.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from lstm_export.common.errors import UserError

from . import fused
from .cell import State, lstm_gates, recur, step_mask


def _check_args(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0) -> None:
    """torch.nn.RNNBase's argument checks, with its error types and messages: code that catches
    torch's errors catches ours (and what torch accepts, we accept)."""
    for name, v in (("bias", bias), ("batch_first", batch_first)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} should be of type bool, got: {type(v).__name__}")
    for name, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} should be of type int, got: {type(v).__name__}")
        if v <= 0:
            raise ValueError(f"{name} must be greater than zero")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                         "element being zeroed")


def _check_dtype(x: Tensor, weight: Tensor, what: str, error=ValueError) -> None:
    """torch's LSTM raises ValueError, its LSTMCell matmul's RuntimeError: the same types, our hint."""
    if x.dtype != weight.dtype:
        raise error(f"{what} input dtype ({x.dtype}) does not match weight dtype ({weight.dtype}). Convert "
                         f"input: input.to({weight.dtype}), or convert model: model.to({x.dtype})")


class LSTMCell(nn.Module):
    """Drop-in for torch.nn.LSTMCell: forward(input, (h, c)) -> (h', c')."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__()  # torch.nn.LSTMCell checks none of its arguments; neither do we
        kw = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size, **kw))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, **kw))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, **kw))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0  # torch's default
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, input: Tensor, hx: State | None = None) -> State:
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: expected input of shape (B, {self.input_size}) or ({self.input_size},), "
                             f"got {tuple(input.shape)}")
        _check_dtype(input, self.weight_ih, "LSTMCell", RuntimeError)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)  # (B, I)
        if hx is None:
            z = x.new_zeros(x.shape[0], self.hidden_size)
            h, c = z, z
        else:
            for k, s in enumerate(hx):
                if s.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{k}] to be 1D or 2D, got {s.dim()}D instead")
            h, c = (s if batched else s.unsqueeze(0) for s in hx)
            for k, s in enumerate((h, c)):  # torch's checks and error types: a state is never broadcast
                if s.dim() != 2 or s.shape[0] != x.shape[0]:
                    raise RuntimeError(f"Input batch size {x.shape[0]} doesn't match hidden{k} batch size {s.shape[0]}")
                if s.shape[1] != self.hidden_size:
                    raise RuntimeError(f"hidden{k} has inconsistent hidden_size: got {s.shape[1]}, "
                                       f"expected {self.hidden_size}")
        gates = x @ self.weight_ih.t() + h @ self.weight_hh.t()  # (B, 4H)
        if self.bias:
            gates = gates + self.bias_ih + self.bias_hh
        h, c = lstm_gates(gates, c)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class LSTM(nn.Module):
    """Drop-in for torch.nn.LSTM (without proj_size).

    forward(input, (h_0, c_0)=None, lengths=None) -> (output, (h_n, c_n)). `input` may be a
    PackedSequence (the output is then packed too), or a padded tensor with `lengths=` in [0, T]:
    steps past a sequence's length emit zeros, and a length of 0 gives zeros and a zero state, as
    the ONNX LSTM's sequence_lens does in ONNX Runtime.
    """

    _cell_update = staticmethod(lstm_gates)
    # The plain cell on the CPU in float32/float64 runs on the native kernel (fused.py) when it
    # is available; False (on an instance) takes the autograd path, which computes the same numbers.
    use_native_kernel = True

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None):
        super().__init__()
        if proj_size:
            raise UserError(f"{type(self).__name__}: proj_size={proj_size} is not supported; "
                            "use proj_size=0 (or torch.nn.LSTM for projected LSTMs)")
        _check_args(input_size, hidden_size, num_layers, bias, batch_first, dropout)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, 0
        kw = {"device": device, "dtype": dtype}
        H = hidden_size
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else H * self.num_directions
            for sfx in self._suffixes():
                name = f"l{layer}{sfx}"
                setattr(self, f"weight_ih_{name}", nn.Parameter(torch.empty(4 * H, layer_in, **kw)))
                setattr(self, f"weight_hh_{name}", nn.Parameter(torch.empty(4 * H, H, **kw)))
                if bias:
                    setattr(self, f"bias_ih_{name}", nn.Parameter(torch.empty(4 * H, **kw)))
                    setattr(self, f"bias_hh_{name}", nn.Parameter(torch.empty(4 * H, **kw)))
                self._extra_parameters(name, kw)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self) -> list[str]:
        return ["", "_reverse"] if self.bidirectional else [""]

    def _extra_parameters(self, name: str, kw: dict) -> None:
        """Hook for subclasses that add per-layer parameters (LayerNormLSTM)."""

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters():
            if name.startswith(("weight_", "bias_")):
                nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s

    def _cell(self, name: str):
        """The state update for direction `name` (e.g. 'l0_reverse'); plain LSTM here."""
        return self._cell_update

    def _native(self, x: Tensor, *tensors) -> bool:
        """The plain cell (not a subclass's) runs on the native kernel where it can."""
        return (self.use_native_kernel and type(self)._cell is LSTM._cell
                and type(self)._cell_update is LSTM._cell_update and fused.available(x, *tensors))

    def _projection(self, x: Tensor, name: str) -> Tensor:
        """All time steps' input projection as one matmul, with both biases folded in."""
        w_ih = getattr(self, f"weight_ih_{name}")
        xw = x @ w_ih.t()  # (T, B, 4H)
        if self.bias:
            xw = xw + (getattr(self, f"bias_ih_{name}") + getattr(self, f"bias_hh_{name}"))
        return xw

    def forward(self, input, hx: State | None = None, lengths: Tensor | None = None):
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("pass either a PackedSequence or lengths=, not both")
            sorted_indices = input.sorted_indices
            x, lengths = pad_packed_sequence(input, batch_first=False)  # (T, B, I), original order
            batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{type(self).__name__}: expected a 3-D (batched) or 2-D (unbatched) input, "
                                 f"got shape {tuple(input.shape)}")
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)  # (T, B, I)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"input.size(-1) must be {self.input_size}, got {x.shape[-1]}")
        _check_dtype(x, self.weight_ih_l0, "RNN")
        T, B = x.shape[0], x.shape[1]
        L, D, H = self.num_layers, self.num_directions, self.hidden_size

        if hx is None:
            h0 = c0 = x.new_zeros(L * D, B, H)
        else:
            h0, c0 = hx
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            if h0.shape != (L * D, B, H) or c0.shape != (L * D, B, H):
                raise ValueError(f"expected hidden states of shape {(L * D, B, H)}, "
                                 f"got {tuple(h0.shape)} and {tuple(c0.shape)}")

        mask = None
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device="cpu").long()
            # 0 is a sequence with no steps (as ONNX's sequence_lens allows): zeros out, the initial state kept
            if lengths.shape != (B,) or (B and (int(lengths.max()) > T or int(lengths.min()) < 0)):
                raise ValueError(f"lengths must be B={B} integers in [0, {T}], got {lengths.tolist()}")
            mask = step_mask(T, lengths).to(x.device)  # (T, B, 1) bool

        h_n, c_n = [], []
        layer_in = x
        for layer in range(L):
            outs = []
            for d, sfx in enumerate(self._suffixes()):
                name = f"l{layer}{sfx}"
                k = layer * D + d
                w_ih, w_hh = getattr(self, f"weight_ih_{name}"), getattr(self, f"weight_hh_{name}")
                b_ih, b_hh = (getattr(self, f"bias_ih_{name}"), getattr(self, f"bias_hh_{name}")) if self.bias \
                    else (None, None)
                if self._native(layer_in, w_ih, w_hh, b_ih, h0):
                    out, h, c = fused.lstm_layer(layer_in, w_ih, w_hh, b_ih, b_hh, h0[k], c0[k], lengths, d == 1)
                else:
                    out, (h, c) = recur(self._projection(layer_in, name), w_hh, h0[k], c0[k], mask, reverse=d == 1,
                                        cell=self._cell(name))
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_in = outs[0] if D == 1 else torch.cat(outs, dim=-1)  # (T, B, D*H)
            if self.dropout and self.training and layer < L - 1:
                layer_in = nn.functional.dropout(layer_in, p=self.dropout, training=True)
        output = layer_in
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)  # (L*D, B, H)
        if lengths is not None and bool((lengths == 0).any()):
            # a sequence of no steps ends in a zero state, as ONNX Runtime's LSTM gives it (not h_0):
            # the exported graph and this model agree
            ran = (lengths > 0).to(h_n.device, h_n.dtype).view(1, -1, 1)
            h_n, c_n = h_n * ran, c_n * ran

        if packed:
            data = pack_padded_sequence(output.index_select(1, sorted_indices), lengths[sorted_indices.cpu()],
                                        enforce_sorted=True).data
            return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), (h_n, c_n)
        if not batched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)


class LayerNormLSTM(LSTM):
    """LSTM with layer normalisation on the gate pre-activations and on the cell.

    As TensorFlow's LayerNormBasicLSTMCell: each of the four gate blocks is normalised on its own
    (gain and shift per block), `forget_bias` is added to f before the sigmoid, the new cell is
    normalised before tanh. Same constructor, forward and parameter names as LSTM, plus
    `ln_gates_weight_l{k}` (4, H), `ln_gates_bias_l{k}` (4, H), `ln_cell_weight_l{k}` (H,) and
    `ln_cell_bias_l{k}` (H,).
    """

    def __init__(self, *args, eps: float = 1e-5, forget_bias: float = 1.0, **kwargs):
        self.eps, self.forget_bias = eps, forget_bias
        super().__init__(*args, **kwargs)

    def _extra_parameters(self, name: str, kw: dict) -> None:
        H = self.hidden_size
        setattr(self, f"ln_gates_weight_{name}", nn.Parameter(torch.ones(4, H, **kw)))
        setattr(self, f"ln_gates_bias_{name}", nn.Parameter(torch.zeros(4, H, **kw)))
        setattr(self, f"ln_cell_weight_{name}", nn.Parameter(torch.ones(H, **kw)))
        setattr(self, f"ln_cell_bias_{name}", nn.Parameter(torch.zeros(H, **kw)))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for name, p in self.named_parameters():
            if name.startswith("ln_"):
                nn.init.ones_(p) if "_weight_" in name else nn.init.zeros_(p)

    def _cell(self, name: str):
        g_w, g_b = getattr(self, f"ln_gates_weight_{name}"), getattr(self, f"ln_gates_bias_{name}")
        c_w, c_b = getattr(self, f"ln_cell_weight_{name}"), getattr(self, f"ln_cell_bias_{name}")
        H, eps, fb = self.hidden_size, self.eps, self.forget_bias

        def update(gates: Tensor, c: Tensor) -> State:
            g = gates.unflatten(-1, (4, H))  # (B, 4, H): normalise each gate block separately
            g = nn.functional.layer_norm(g, (H,), eps=eps) * g_w + g_b
            i, f, gg, o = g.unbind(-2)  # each (B, H)
            c = torch.sigmoid(f + fb) * c + torch.sigmoid(i) * torch.tanh(gg)
            c = nn.functional.layer_norm(c, (H,), weight=c_w, bias=c_b, eps=eps)
            h = torch.sigmoid(o) * torch.tanh(c)
            return h, c

        return update
