"""Round-to-nearest onto an integer grid (``INT4_G128``, per-channel ``INT8_PC`` ...), with a weighted
clip search.

ggml has no quantizer for the MatMulNBits/OpenVINO format, so this one is ours. Per group the range
``[min, max]`` (``max |w|`` when symmetric) is shrunk by each factor in ``CLIP`` and the factor with
the least importance-weighted squared error wins: the same idea as AWQ's clip search and llama.cpp's
``make_qkx`` scale search, and what makes RTN on this grid competitive with onnxruntime's quantizer.
"""
from __future__ import annotations

import numpy as np

from quantizers.grids import BlockFields, IntType, grid

CLIP = np.array([1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7], dtype=np.float32)


def fit(t: IntType, w: np.ndarray, importance: np.ndarray | None = None) -> BlockFields:
    """Scales, zero points and codes for ``w`` [rows, cols] (cols a multiple of the group size; per-channel:
    one group per row)."""
    rows, cols = w.shape
    g = grid(t, cols)      # raises when the rows do not fit the grid
    group = g.block
    x = np.asarray(w, dtype=np.float32).reshape(rows, cols // group, group)
    imp = np.ones(cols, np.float32) if importance is None else np.asarray(importance, np.float32) + 1e-8
    imp = imp.reshape(1, cols // group, group)
    qmax = (1 << t.bits) - 1
    best_err = np.full(x.shape[:2], np.inf, dtype=np.float32)
    best_d = np.zeros(x.shape[:2], np.float32)
    best_z = np.zeros(x.shape[:2], np.uint8)
    if t.sym:
        amax = np.abs(x).max(axis=2)
    else:  # the range always holds 0, so zero weights are exact (as GPTQ's reference quantizer does)
        lo, hi = np.minimum(x.min(axis=2), 0), np.maximum(x.max(axis=2), 0)
    for c in CLIP:
        if t.sym:
            d = amax * c / (t.zero - 1)
            z = np.full(d.shape, t.zero, np.float32)
        else:
            d = (hi - lo) * c / qmax
            z = np.clip(np.round(-lo * c / np.where(d > 0, d, 1)), 0, qmax)
        d = d.astype(np.float16).astype(np.float32)  # the stored scale is float16: choose codes for it
        inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0).astype(np.float32)
        q = np.clip(np.round(x * inv[..., None]) + z[..., None], 0, qmax)
        err = (imp * ((q - z[..., None]) * d[..., None] - x) ** 2).sum(axis=2)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, d, best_d)
        best_z = np.where(better, z, best_z).astype(np.uint8)
    inv = np.where(best_d > 0, 1 / np.where(best_d > 0, best_d, 1), 0).astype(np.float32)
    codes = np.clip(np.round(x * inv[..., None]) + best_z[..., None], 0, qmax).astype(np.uint8)
    return BlockFields(g, codes.reshape(rows, cols), {"d": best_d.astype(np.float16), "z": best_z})
