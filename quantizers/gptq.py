"""GPTQ (Frantar et al., 2022) rounding onto exactly the target grid.

Columns are quantized one at a time and each column's rounding error is spread over the columns not
yet quantized, weighted by the inverse Hessian ``H = X^T X`` of the layer's calibration inputs
(Cholesky form, lazy block updates). What differs from the reference implementation is the grid:
for a GGUF block type, when the sweep reaches a block, ggml's own quantizer fits that block's scales
and mins (super-block ``d``/``dmin`` and 6-bit sub-scales for K-quants) on the *error-updated*
weights, with the Hessian diagonal as importance; the sweep then only chooses codes on that fixed
grid. The result packs into the very bytes llama.cpp executes. With ``act_order`` the columns are
visited by decreasing Hessian diagonal and the block parameters are fitted up front (static groups).

A per-channel integer grid (``INT4_PC``) has one block per row: its scales and zero points are fitted
on the whole weight before the sweep, as the reference implementation does without groups, and the
sweep's lazy batches keep their own width (``block_size``) instead of growing to the row length.
"""
from __future__ import annotations

import numpy as np
import torch

from quantizers import ggml, intgrid
from quantizers.grids import BlockFields, Grid, IntType, Target, grid, unpack
from quantizers.tensor import QuantizedTensor


def _fit_block(g: Grid, w: torch.Tensor, importance: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Scales/offsets [rows, block/sub] and raw params that the grid's own RTN search (ggml's for GGUF
    types) chooses for ``w`` [rows, block]."""
    if isinstance(g.type, IntType):
        f = intgrid.fit(g.type, w.numpy(), importance)
    else:
        f = unpack(g, ggml.quantize_rows(int(g.type), w.numpy(), importance), w.shape[1])
    scale, offset = f.scale_offset()
    return torch.from_numpy(scale), torch.from_numpy(offset), f.params


def _round(g: Grid, w: torch.Tensor, s: torch.Tensor, o: torch.Tensor, levels: torch.Tensor,
           mids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest grid value to each entry of ``w`` (one column) given per-row scale/offset: (codes, values)."""
    t = torch.where(s != 0, (w + o) / torch.where(s != 0, s, 1), torch.zeros_like(w))
    code = torch.bucketize(t, mids)
    return code, s * levels[code] - o  # float32, the runtime's own arithmetic


def inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), which GPTQ's sweep reads row by row.

    Computed as the inverse of ``H``'s "upper-lower" factor ``R`` (``H = R R^T``, from the Cholesky of
    ``H`` with rows and columns reversed): one factorisation and one triangular inverse, half the work
    of inverting ``H`` and factoring again, and no explicit inverse of an ill-conditioned matrix.
    """
    R = torch.linalg.cholesky(H.flip(0, 1)).flip(0, 1)      # upper triangular, H = R R^T
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.solve_triangular(R, eye, upper=True)  # R^-1: upper, H^-1 = R^-T R^-1


def gptq(name: str, weight: np.ndarray, hessian: np.ndarray, target: Target, *, block_size: int = 128,
         damp: float = 0.01, act_order: bool = False) -> QuantizedTensor:
    """Quantize ``weight`` [out, in] onto ``target`` (a GGUF block type or an integer grid) with GPTQ;
    ``hessian`` is [in, in]."""
    rows, cols = weight.shape
    try:
        g = grid(target, cols)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if cols % g.block:
        raise ValueError(f"{name}: {cols} columns is not a multiple of {target.name}'s block {g.block}")
    per_channel = isinstance(target, IntType) and target.per_channel
    W = torch.tensor(weight, dtype=torch.float32)
    # float64 for the factorisation: Qwen's outlier channels give Hessians a dynamic range f32 cannot factor
    H = torch.tensor(hessian, dtype=torch.float64)
    importance = np.clip(np.diag(hessian).astype(np.float32), 0, None)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    Hinv = inverse_cholesky(H[perm][:, perm]).to(torch.float32)

    levels = torch.from_numpy(g.levels)
    mids = (levels[1:] + levels[:-1]) / 2
    nsub = g.block // g.sub
    scales = torch.empty(rows, cols // g.sub)
    offsets = torch.empty_like(scales)
    params: list[dict] = [None] * (cols // g.block)  # type: ignore[list-item]

    def fit(b: int, w_block: torch.Tensor) -> None:
        s, o, p = _fit_block(g, w_block, importance[b * g.block:(b + 1) * g.block])
        scales[:, b * nsub:(b + 1) * nsub], offsets[:, b * nsub:(b + 1) * nsub] = s, o
        params[b] = p

    static = act_order or per_channel
    if static:  # static groups: every block's grid from the original weights
        for b in range(cols // g.block):
            fit(b, W[:, b * g.block:(b + 1) * g.block])
        W = W[:, perm]
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    # lazy batches start on block boundaries so a block is fitted on fully updated weights; a static
    # grid needs no such alignment (and a per-channel "block" is the whole row: far too wide a batch)
    bs = block_size if per_channel else max(block_size, g.block) // g.block * g.block
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        if not static:  # fit grids on the weights as updated so far (like GPTQ's groups)
            for b in range(i1 // g.block, i2 // g.block):
                fit(b, W[:, b * g.block:(b + 1) * g.block])
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            sub = col // g.sub
            w = W1[:, i]
            code, q = _round(g, w, scales[:, sub], offsets[:, sub], levels, mids)
            codes[:, col] = code.to(torch.uint8)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    merged = {k: np.concatenate([p[k] for p in params], axis=1) for k in params[0]}
    return QuantizedTensor.from_fields(name, BlockFields(g, codes.numpy(), merged))
