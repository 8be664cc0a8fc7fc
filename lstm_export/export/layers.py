"""The LSTM stack as ONNX: `native` (one ONNX LSTM node per layer) or `unrolled` (plain ops per step).

Both take a time-major input value (T, B, I) and return (output (T, B, D*H), h_n, c_n) values.
Names follow the ONNX spec (X, W, R, B, initial_h ...) here and PyTorch's in the model code.
"""
from __future__ import annotations

import numpy as np

from .graph import GraphBuilder

# PyTorch stacks the gate blocks i, f, g, o; ONNX stacks i, o, f, c (c = PyTorch's g).
TORCH_TO_ONNX_GATES = [0, 3, 1, 2]
ONNX_TO_TORCH_GATES = [0, 2, 3, 1]  # its inverse


def torch_to_onnx_gates(w: np.ndarray, H: int) -> np.ndarray:
    """A PyTorch weight or bias (4H leading axis, gates i, f, g, o) in ONNX gate order (i, o, f, c).
    The one gate-order helper: export and the GPU bench (its inverse) use it."""
    return w.reshape(4, H, *w.shape[1:])[TORCH_TO_ONNX_GATES].reshape(w.shape)


def onnx_to_torch_gates(w: np.ndarray, H: int) -> np.ndarray:
    """The inverse of torch_to_onnx_gates."""
    return w.reshape(4, H, *w.shape[1:])[ONNX_TO_TORCH_GATES].reshape(w.shape)


def _weights(lstm, name: str):
    """(w_ih (4H, I), w_hh (4H, H), b_ih (4H,) | None, b_hh | None) as float32 numpy, PyTorch order."""
    get = lambda k: getattr(lstm, f"{k}_{name}").detach().cpu().float().numpy()  # noqa: E731
    return get("weight_ih"), get("weight_hh"), (get("bias_ih") if lstm.bias else None), \
        (get("bias_hh") if lstm.bias else None)


def _state_slice(g: GraphBuilder, state: str | None, start: int, stop: int, tag: str) -> str | None:
    if state is None:
        return None
    return g.op("Slice", [state, g.const(f"{tag}_starts", np.array([start], np.int64)),
                          g.const(f"{tag}_ends", np.array([stop], np.int64)),
                          g.const("axis0", np.array([0], np.int64))], name=tag)


def native_stack(g: GraphBuilder, lstm, x: str, h0: str | None, c0: str | None, lengths: str | None):
    """One ONNX LSTM node per layer; bidirectional layers use direction='bidirectional'."""
    L, D, H = lstm.num_layers, lstm.num_directions, lstm.hidden_size
    hs, cs = [], []
    for layer in range(L):
        names = [f"l{layer}{sfx}" for sfx in lstm._suffixes()]
        ws = [_weights(lstm, n) for n in names]
        W = np.stack([torch_to_onnx_gates(w_ih, H) for w_ih, _, _, _ in ws])  # (D, 4H, I)
        R = np.stack([torch_to_onnx_gates(w_hh, H) for _, w_hh, _, _ in ws])  # (D, 4H, H)
        inputs = [x, g.const(f"W_l{layer}", W), g.const(f"R_l{layer}", R)]
        if lstm.bias:
            B = np.stack([np.concatenate([torch_to_onnx_gates(b_ih, H), torch_to_onnx_gates(b_hh, H)])
                          for _, _, b_ih, b_hh in ws])
            inputs.append(g.const(f"B_l{layer}", B))  # (D, 8H) = [Wb; Rb]
        else:
            inputs.append("")
        inputs.append(lengths or "")
        inputs.append(_state_slice(g, h0, layer * D, (layer + 1) * D, f"initial_h_l{layer}") or "")
        inputs.append(_state_slice(g, c0, layer * D, (layer + 1) * D, f"initial_c_l{layer}") or "")
        while inputs and inputs[-1] == "":  # trailing optional inputs are simply left out
            inputs.pop()
        Y, Y_h, Y_c = g.op("LSTM", inputs, n_out=3, name=f"lstm_l{layer}", hidden_size=H,
                           direction="bidirectional" if D == 2 else "forward")
        if D == 1:
            x = g.op("Squeeze", [Y, g.const("axis1", np.array([1], np.int64))], name=f"y_l{layer}")  # (T, B, H)
        else:
            y = g.op("Transpose", [Y], name=f"y_tbdh_l{layer}", perm=[0, 2, 1, 3])  # (T, B, D, H)
            x = g.op("Reshape", [y, g.const("shape_tb_dh", np.array([0, 0, D * H], np.int64))], name=f"y_l{layer}")
        hs.append(Y_h)
        cs.append(Y_c)
    h_n = hs[0] if L == 1 else g.op("Concat", hs, name="h_n_all", axis=0)  # (L*D, B, H)
    c_n = cs[0] if L == 1 else g.op("Concat", cs, name="c_n_all", axis=0)
    return x, h_n, c_n


def unrolled_stack(g: GraphBuilder, lstm, x: str, T: int, h0: str | None, c0: str | None):
    """The recurrence written out step by step: MatMul, Add, Split, Sigmoid, Tanh, Mul, Concat.

    No Shape/Gather chains: every shape is a constant, and the batch axis stays symbolic only
    through broadcasting. Each state is kept as (1, B, H) so no Squeeze/Unsqueeze is needed.
    """
    L, D, H = lstm.num_layers, lstm.num_directions, lstm.hidden_size
    layernorm = hasattr(lstm, "ln_gates_weight_l0")
    hs, cs = [], []
    for layer in range(L):
        outs = []
        for d, sfx in enumerate(lstm._suffixes()):
            name = f"l{layer}{sfx}"
            w_ih, w_hh, b_ih, b_hh = _weights(lstm, name)
            xw = g.op("MatMul", [x, g.const(f"W_ih_T_{name}", w_ih.T)], name=f"xw_{name}")  # (T, B, 4H)
            if b_ih is not None:
                xw = g.op("Add", [xw, g.const(f"b_{name}", b_ih + b_hh)], name=f"xwb_{name}")
            steps = [xw] if T == 1 else g.op("Split", [xw, g.const(f"ones_T{T}", np.ones(T, np.int64))],
                                             n_out=T, name=f"xw_steps_{name}", axis=0)  # T x (1, B, 4H)
            k = layer * D + d
            h = _state_slice(g, h0, k, k + 1, f"h0_{name}")
            c = _state_slice(g, c0, k, k + 1, f"c0_{name}")
            R_T = g.const(f"R_T_{name}", w_hh.T)  # (H, 4H)
            ln = _ln_consts(g, lstm, name) if layernorm else None
            hs_t = [None] * T
            for t in (range(T - 1, -1, -1) if d else range(T)):
                gates = steps[t] if h is None else g.op("Add", [steps[t], g.op("MatMul", [h, R_T], name=f"hr_{name}")],
                                                        name=f"gates_{name}")
                h, c = _cell(g, gates, c, H, name, ln)
                hs_t[t] = h
            outs.append(hs_t[0] if T == 1 else g.op("Concat", hs_t, name=f"y_{name}", axis=0))  # (T, B, H)
            hs.append(h)
            cs.append(c)
        x = outs[0] if D == 1 else g.op("Concat", outs, name=f"y_l{layer}", axis=2)  # (T, B, D*H)
    h_n = hs[0] if len(hs) == 1 else g.op("Concat", hs, name="h_n_all", axis=0)
    c_n = cs[0] if len(cs) == 1 else g.op("Concat", cs, name="c_n_all", axis=0)
    return x, h_n, c_n


def _ln_consts(g: GraphBuilder, lstm, name: str) -> dict:
    get = lambda k: getattr(lstm, f"{k}_{name}").detach().cpu().float().numpy()  # noqa: E731
    H = lstm.hidden_size
    return {"ones": g.const(f"ln_ones_H{H}", np.ones(H, np.float32)),
            "zeros": g.const(f"ln_zeros_H{H}", np.zeros(H, np.float32)),
            "gates_w": g.const(f"ln_gates_w_{name}", get("ln_gates_weight")),  # (4, H)
            "gates_b": g.const(f"ln_gates_b_{name}", get("ln_gates_bias")),
            "cell_w": g.const(f"ln_cell_w_{name}", get("ln_cell_weight")),
            "cell_b": g.const(f"ln_cell_b_{name}", get("ln_cell_bias")),
            "forget_bias": g.const(f"forget_bias_{name}", np.float32(lstm.forget_bias)),
            "shape4": g.const(f"shape_1b4h_H{H}", np.array([1, 0, 4, H], np.int64)),
            "shape1": g.const(f"shape_1b4h_flat_H{H}", np.array([1, 0, 4 * H], np.int64)),
            "eps": lstm.eps}


def _cell(g: GraphBuilder, gates: str, c: str | None, H: int, name: str, ln: dict | None):
    """One LSTM update from fused pre-activations (1, B, 4H) in PyTorch order i, f, g, o."""
    if ln is not None:  # normalise each gate block on its own, then its own gain and shift
        blocks = g.op("Reshape", [gates, ln["shape4"]], name=f"gate_blocks_{name}")  # (1, B, 4, H)
        normed = g.op("LayerNormalization", [blocks, ln["ones"], ln["zeros"]], name=f"gates_ln_{name}",
                      axis=-1, epsilon=ln["eps"])
        affine = g.op("Add", [g.op("Mul", [normed, ln["gates_w"]], name=f"gates_gain_{name}"), ln["gates_b"]],
                      name=f"gates_shift_{name}")
        gates = g.op("Reshape", [affine, ln["shape1"]], name=f"gates_normed_{name}")
    i, f, gg, o = g.op("Split", [gates, g.const(f"gate_split_H{H}", np.full(4, H, np.int64))], n_out=4,
                       name=f"gate_{name}", axis=2)
    if ln is not None:
        f = g.op("Add", [f, ln["forget_bias"]], name=f"f_biased_{name}")
    ig = g.op("Mul", [g.op("Sigmoid", [i], name=f"i_{name}"), g.op("Tanh", [gg], name=f"g_{name}")], name=f"ig_{name}")
    if c is None:  # zero initial cell: f * c vanishes
        c_new = ig
    else:
        c_new = g.op("Add", [g.op("Mul", [g.op("Sigmoid", [f], name=f"f_{name}"), c], name=f"fc_{name}"), ig],
                     name=f"c_{name}")
    if ln is not None:
        c_new = g.op("LayerNormalization", [c_new, ln["cell_w"], ln["cell_b"]], name=f"c_ln_{name}",
                     axis=-1, epsilon=ln["eps"])
    h_new = g.op("Mul", [g.op("Sigmoid", [o], name=f"o_{name}"), g.op("Tanh", [c_new], name=f"tanh_c_{name}")],
                 name=f"h_{name}")
    return h_new, c_new
