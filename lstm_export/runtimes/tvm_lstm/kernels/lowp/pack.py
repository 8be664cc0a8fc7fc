"""Weight packing for the bf16 LSTM kernel (lowp_lstm.c): plain NumPy, no TVM.

bf16 is the upper half of a float32, rounded to nearest even here as VCVTNEPS2BF16 rounds x and h
in the kernel. Layout (the C file's header says why both engines read it): unit blocks of 16
units; for block u, k pair kp and gate g (ONNX order i, o, f, c) the 16 units' two k values
interleaved, w[u, kp, g, j, s] = W[g*H + 16u + j, 2kp + s]; K padded to a multiple of 32 and units
to 16 with zeros.
"""
from __future__ import annotations

import numpy as np

UNITS = 16  # units per block: one AVX-512 register of fp32, one AMX tile's columns
K_BLOCK = 32  # k per AMX tile row (64 bytes of bf16)
K_BLOCK_INT8 = 64  # k per AMX tile row of int8 (the kernel pads K so for every int8 engine)


def ceil_to(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(np.asarray(a, np.float32))
    return np.where(nan, (bits >> 16) | 0x40, rounded).astype(np.uint16)


def from_bf16(b: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32, exactly."""
    return (np.asarray(b, np.uint16).astype(np.uint32) << 16).view(np.float32)


def _gates(w: np.ndarray, hidden: int, k_block: int) -> np.ndarray:
    """ONNX-ordered (4H, K) weights as (4, H padded to 16, K padded to k_block) float32, zeros past."""
    k = w.shape[1]
    g = np.zeros((4, ceil_to(hidden, UNITS), ceil_to(max(k, 1), k_block)), np.float32)
    g[:, :hidden, :k] = np.asarray(w, np.float32).reshape(4, hidden, k)
    return g


def pack_weights(w: np.ndarray, hidden: int) -> np.ndarray:
    """ONNX-ordered (4H, K) float32 weights -> flat bf16 bits in the kernel's layout."""
    g = _gates(w, hidden, K_BLOCK)
    _, hp, kk = g.shape
    # (4, UB, 16, KP, 2) -> (UB, KP, 4, 16, 2)
    g = g.reshape(4, hp // UNITS, UNITS, kk // 2, 2).transpose(1, 3, 0, 2, 4)
    return to_bf16(np.ascontiguousarray(g)).ravel()


def pack_bias(bias: np.ndarray, hidden: int) -> np.ndarray:
    """(4H,) float32 (Wb + Rb) -> (UB, 4, 16) float32, zero past H."""
    hp = ceil_to(hidden, UNITS)
    b = np.zeros((4, hp), np.float32)
    b[:, :hidden] = np.asarray(bias, np.float32).reshape(4, hidden)
    return np.ascontiguousarray(b.reshape(4, hp // UNITS, UNITS).transpose(1, 0, 2)).ravel()


def pack_peepholes(p: np.ndarray | None, hidden: int) -> np.ndarray:
    """(3H,) peepholes p_i, p_o, p_f -> (3, H padded to 16) float32 (zeros without them)."""
    out = np.zeros((3, ceil_to(hidden, UNITS)), np.float32)
    if p is not None:
        out[:, :hidden] = np.asarray(p, np.float32).reshape(3, hidden)
    return out


def pack_int8(w: np.ndarray, hidden: int) -> np.ndarray:
    """ONNX-ordered (4H, K) float32 weights -> the int8 engine's bytes (lowp_lstm.c): per output row
    (gate and unit) the scale max|row| / 127 and round(w / scale) as int8, laid out like
    pack_weights with four k per 32-bit lane, w[u, kq, g, j, s] = q[g*H + 16u + j, 4kq + s]; then
    the scales (UB, 4, 16) float32 and 128 x each row's sum of q (UB, 4, 16) int32, which the kernel
    subtracts because its activations are unsigned (q + 128)."""
    g = _gates(w, hidden, K_BLOCK_INT8)
    _, hp, kk = g.shape
    top = np.abs(g).max(axis=2)  # (4, hp)
    scale = np.where(top > 0, top / 127.0, 1.0).astype(np.float32)
    q = np.rint(g / scale[:, :, None]).clip(-127, 127).astype(np.int8)
    packed = q.reshape(4, hp // UNITS, UNITS, kk // 4, 4).transpose(1, 3, 0, 2, 4)  # (UB, KQ, 4, 16, 4)
    scales = scale.reshape(4, hp // UNITS, UNITS).transpose(1, 0, 2)  # (UB, 4, 16)
    csum = (128 * q.astype(np.int32).sum(axis=2)).reshape(4, hp // UNITS, UNITS).transpose(1, 0, 2)
    return np.concatenate([np.ascontiguousarray(packed).ravel().view(np.uint8),
                           np.ascontiguousarray(scales, np.float32).ravel().view(np.uint8),
                           np.ascontiguousarray(csum, np.int32).ravel().view(np.uint8)])


def dequantize_int8(w: np.ndarray) -> np.ndarray:
    """The weights pack_int8 stands for, (4H, K) float32 as round(w / scale) * scale (tests' oracle)."""
    w = np.asarray(w, np.float32)
    top = np.abs(w).max(axis=1, keepdims=True)
    scale = np.where(top > 0, top / 127.0, 1.0).astype(np.float32)
    return (np.rint(w / scale).clip(-127, 127) * scale).astype(np.float32)
