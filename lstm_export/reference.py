"""Float64 numpy reference for the LSTM family, written independently of the torch model.

Used only as an oracle in tests and fidelity reports. It loops over time, batch-wide, with no
hoisting or fusing, reads weights by PyTorch parameter name from a plain dict of arrays, and
handles variable lengths by running each sequence on its own.
"""
from __future__ import annotations

import numpy as np


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)  # biased variance, as torch
    return (x - mu) / np.sqrt(var + eps) * w + b


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, ln=None):
    """One step. x (B, I), h and c (B, H); weights in PyTorch layout, gates i, f, g, o.

    ln: None for a plain LSTM, else a dict with gates_w (4, H), gates_b (4, H), cell_w (H,),
    cell_b (H,), eps and forget_bias (LayerNorm LSTM as TensorFlow's LayerNormBasicLSTMCell).
    """
    H = h.shape[-1]
    z = x @ w_ih.T + h @ w_hh.T
    if b_ih is not None:
        z = z + b_ih + b_hh
    blocks = [z[:, k * H:(k + 1) * H] for k in range(4)]
    if ln is not None:
        blocks = [_layer_norm(blk, ln["gates_w"][k], ln["gates_b"][k], ln["eps"]) for k, blk in enumerate(blocks)]
        blocks[1] = blocks[1] + ln["forget_bias"]
    i, f, g, o = _sigmoid(blocks[0]), _sigmoid(blocks[1]), np.tanh(blocks[2]), _sigmoid(blocks[3])
    c_new = f * c + i * g
    if ln is not None:
        c_new = _layer_norm(c_new, ln["cell_w"], ln["cell_b"], ln["eps"])
    return o * np.tanh(c_new), c_new


def _params(state: dict, name: str, layernorm: dict | None):
    g = lambda k: None if k not in state else np.asarray(state[k], dtype=np.float64)  # noqa: E731
    ln = None
    if layernorm is not None:
        ln = {"gates_w": g(f"ln_gates_weight_{name}"), "gates_b": g(f"ln_gates_bias_{name}"),
              "cell_w": g(f"ln_cell_weight_{name}"), "cell_b": g(f"ln_cell_bias_{name}"), **layernorm}
    return g(f"weight_ih_{name}"), g(f"weight_hh_{name}"), g(f"bias_ih_{name}"), g(f"bias_hh_{name}"), ln


def lstm_sequence(state: dict, x: np.ndarray, num_layers: int, bidirectional: bool = False,
                  h0: np.ndarray | None = None, c0: np.ndarray | None = None,
                  lengths=None, layernorm: dict | None = None):
    """A whole (multi-layer, optionally bidirectional) LSTM over a time-major batch.

    state: PyTorch-named parameters (`model.state_dict()`), any array type. x: (T, B, I).
    h0, c0: (L*D, B, H) or None for zeros. lengths: B ints in [0, T] or None; padded outputs are
    zero, and a length of 0 leaves a zero final state.
    layernorm: {"eps": .., "forget_bias": ..} for a LayerNormLSTM, else None.
    Returns output (T, B, D*H), h_n (L*D, B, H), c_n (L*D, B, H), all float64.
    """
    x = np.asarray(x, dtype=np.float64)
    T, B, _ = x.shape
    D = 2 if bidirectional else 1
    H = np.asarray(state["weight_hh_l0"]).shape[1]
    h0 = np.zeros((num_layers * D, B, H)) if h0 is None else np.asarray(h0, dtype=np.float64)
    c0 = np.zeros((num_layers * D, B, H)) if c0 is None else np.asarray(c0, dtype=np.float64)
    lengths = [T] * B if lengths is None else [int(n) for n in lengths]
    h_n = np.zeros((num_layers * D, B, H))
    c_n = np.zeros((num_layers * D, B, H))
    inp = x
    for layer in range(num_layers):
        out = np.zeros((T, B, D * H))
        for d in range(D):
            name = f"l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh, b_ih, b_hh, ln = _params(state, name, layernorm)
            k = layer * D + d
            for b in range(B):  # one sequence at a time: padding never touches the recurrence
                n = lengths[b]
                h, c = h0[k, b:b + 1], c0[k, b:b + 1]
                order = range(n - 1, -1, -1) if d else range(n)
                for t in order:
                    h, c = lstm_cell(inp[t, b:b + 1], h, c, w_ih, w_hh, b_ih, b_hh, ln)
                    out[t, b, d * H:(d + 1) * H] = h[0]
                if n:  # a sequence of no steps ends in zeros (ONNX Runtime's sequence_lens = 0)
                    h_n[k, b], c_n[k, b] = h[0], c[0]
        inp = out
    return inp, h_n, c_n
