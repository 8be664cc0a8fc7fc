"""Weight packing for the fast CPU kernel: plain NumPy, no TVM.

Hidden units are grouped in unit blocks of `lanes` (one vector register of float32: 16 on AVX-512,
8 on AVX2, 4 on NEON and SSE); for unit block u the four ONNX gates i, o, f, c sit next to each
other, so a row of the packed weights is [i of `lanes` units | o | f | c]. The last block is only
as wide as its real units rounded up to lanes/4 (`tail_width`), so that its 4 gates fill whole
registers: with 16 lanes H=100 computes 104 units, not 112. Past the real units the weights are
zero; padded units never feed real ones (rows of R past H are never read) and are never written.
"""
from __future__ import annotations

import numpy as np


def padded(hidden: int, lanes: int) -> int:
    """Hidden units rounded up to whole unit blocks."""
    return (hidden + lanes - 1) // lanes * lanes


def tail_width(hidden: int, lanes: int) -> int:
    """Lanes of the last unit block: its real units rounded up to lanes/4, so that its 4 gates fill
    4*width/lanes whole registers."""
    granule = max(1, lanes // 4)
    last = hidden - (padded(hidden, lanes) // lanes - 1) * lanes
    return (last + granule - 1) // granule * granule


def packed_size(hidden: int, rows: int, lanes: int) -> int:
    """Floats in the packed form of a (4*hidden, rows) weight: full blocks, then the tail block."""
    ub = padded(hidden, lanes) // lanes
    return (ub - 1) * rows * 4 * lanes + rows * 4 * tail_width(hidden, lanes)


def pack_gates(w: np.ndarray, hidden: int, lanes: int) -> np.ndarray:
    """ONNX-ordered (4H, K) weights -> flat float32: unit block u (`lanes` wide, the last one
    tail_width wide: bw) is a (K, 4, bw) slab at offset u*K*4*lanes, gates in ONNX order i, o, f, c
    side by side for each row k, zero past the real units."""
    k = w.shape[1]
    ub = padded(hidden, lanes) // lanes
    tw = tail_width(hidden, lanes)
    gates = np.asarray(w, np.float32).reshape(4, hidden, k)
    out = np.zeros(packed_size(hidden, k, lanes), np.float32)
    for u in range(ub):
        bw = lanes if u < ub - 1 else tw
        n = min(bw, hidden - u * lanes)
        slab = np.zeros((k, 4, bw), np.float32)
        slab[:, :, :n] = gates[:, u * lanes:u * lanes + n, :].transpose(2, 0, 1)
        out[u * k * 4 * lanes:u * k * 4 * lanes + k * 4 * bw] = slab.ravel()
    return out


def pack_bias(b: np.ndarray, hidden: int, lanes: int) -> np.ndarray:
    """(4H,) -> flat, in the packed column order (one row of pack_gates)."""
    return pack_gates(np.asarray(b, np.float32).reshape(4 * hidden, 1), hidden, lanes)


def gru_as_gates(w: np.ndarray, r: np.ndarray, b: np.ndarray | None, hidden: int):
    """A GRU direction with linear_before_reset as the kernel's four column groups (cpu_cells):
    (z, r, x*Wh + Wbh, h*Rh + Rbh). Returns (W (4H, K), R (4H, H), bias (4H,)), ONNX-ordered for
    pack_gates: the input part of the last group and the recurrent part of the third are zero."""
    H = hidden
    b = np.zeros(6 * H, np.float32) if b is None else np.asarray(b, np.float32)
    zero_w, zero_r = np.zeros((H, w.shape[1]), np.float32), np.zeros((H, H), np.float32)
    w4 = np.concatenate([w[:2 * H], w[2 * H:], zero_w])
    r4 = np.concatenate([r[:2 * H], zero_r, r[2 * H:]])
    bias = np.concatenate([b[:2 * H] + b[3 * H:5 * H], b[2 * H:3 * H], b[5 * H:]])
    return w4.astype(np.float32), r4.astype(np.float32), bias.astype(np.float32)


def unit_groups(a: np.ndarray, n: int) -> np.ndarray:
    """Rows 0..n-1 of `a` as four groups of ceil(n/4) (unit j of group g: row g*ceil(n/4) + j), zero
    past n: the ONNX-ordered form pack_gates takes with hidden ceil(n/4)."""
    out = np.zeros((4 * -(-n // 4),) + a.shape[1:], np.float32)
    out[:n] = a[:n]
    return out


def rnn_as_gates(w: np.ndarray, r: np.ndarray, b: np.ndarray | None, hidden: int):
    """An RNN direction as four column groups of U = ceil(H/4) units (unit j of group g is hidden
    unit g*U + j, cpu_cells): (W (4U, K), R (4U, H), bias (4U,)) for pack_gates with hidden U,
    zero past the H real units."""
    H = hidden
    b = np.zeros(2 * H, np.float32) if b is None else np.asarray(b, np.float32)
    return unit_groups(np.asarray(w, np.float32), H), unit_groups(np.asarray(r, np.float32), H), \
        unit_groups(b[:H] + b[H:], H)


def gru0_as_passes(w: np.ndarray, r: np.ndarray, b: np.ndarray | None, hidden: int):
    """A GRU direction without linear_before_reset as the kernel's two passes (cpu_cells.PassLayout):
    z and r as 2H grouped units from x and h, then h's candidate from x*Wh and (r (.) Ht-1)*Rh
    (Rbh sits outside the product: it joins the bias). [(W, R, bias) of pass A, of pass B]."""
    H = hidden
    w, r = np.asarray(w, np.float32), np.asarray(r, np.float32)
    b = np.zeros(6 * H, np.float32) if b is None else np.asarray(b, np.float32)
    bias = b[:3 * H] + b[3 * H:]
    return [(unit_groups(w[:2 * H], 2 * H), unit_groups(r[:2 * H], 2 * H), unit_groups(bias[:2 * H], 2 * H)),
            (unit_groups(w[2 * H:], H), unit_groups(r[2 * H:], H), unit_groups(bias[2 * H:], H))]
