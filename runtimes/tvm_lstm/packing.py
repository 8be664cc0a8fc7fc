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
