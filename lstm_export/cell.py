"""The LSTM recurrence in plain torch ops: the autograd path of the drop-in, and the path the native
kernel's autograd node (fused.py) recomputes through when a backward must itself be differentiable
(create_graph=True) or runs under vmap (batched gradients). Every order of derivative of these ops is
torch's own, so whatever calls them inherits exact higher-order gradients."""
from __future__ import annotations

import torch
from torch import Tensor

State = tuple[Tensor, Tensor]


def step_mask(T: int, lengths: Tensor) -> Tensor:
    """(T, B, 1) bool, True on the steps each of the B sequences has (lengths (B,) in [0, T])."""
    steps = torch.arange(T).unsqueeze(1)  # (T, 1)
    return (steps < lengths.unsqueeze(0)).unsqueeze(-1)


def lstm_gates(gates: Tensor, c: Tensor) -> State:
    """The LSTM state update from fused pre-activations (.., 4H) in PyTorch order i, f, g, o."""
    i, f, g, o = gates.chunk(4, dim=-1)  # each (B, H)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (B, H)
    h = torch.sigmoid(o) * torch.tanh(c)  # (B, H)
    return h, c


def recur(xw: Tensor, w_hh: Tensor, h: Tensor, c: Tensor, mask: Tensor | None, reverse: bool,
          cell=None) -> tuple[Tensor, State]:
    """Runs one direction of one layer over time.

    xw: (T, B, 4H) input projection with both biases already added; h, c: (B, H);
    mask: (T, B, 1) bool, True on valid steps, or None when every sequence is full length.
    Padded steps keep the state unchanged and emit zeros, so a reverse pass starts each
    sequence at its own last valid step with the initial state, like torch on packed input.
    `cell(gates, c) -> (h, c)` defaults to the plain LSTM update.
    """
    cell = cell or lstm_gates
    T = xw.shape[0]
    outs: list[Tensor] = [None] * T  # type: ignore[list-item]
    steps = range(T - 1, -1, -1) if reverse else range(T)
    w_hh_t = w_hh.t()  # (H, 4H)
    # unbind, not xw[t]: the backward of T separate selects would build T full-size zero tensors.
    xs = xw.unbind(0)
    ms = mask.unbind(0) if mask is not None else None
    for t in steps:
        gates = torch.addmm(xs[t], h, w_hh_t)  # (B, 4H)
        h_new, c_new = cell(gates, c)
        if ms is not None:
            m = ms[t]  # (B, 1)
            h = torch.where(m, h_new, h)
            c = torch.where(m, c_new, c)
            outs[t] = torch.where(m, h_new, 0.0)
        else:
            h, c = h_new, c_new
            outs[t] = h
    return torch.stack(outs), (h, c)  # (T, B, H)
