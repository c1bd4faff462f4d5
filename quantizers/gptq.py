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

The sweep reads the upper Cholesky factor of the inverse Hessian (:func:`inverse_cholesky`). It is
computed in float64 up to :data:`quantizers.linalg.LARGE_HESSIAN` columns (two float64 matrices at most
at once) and above that in float32, in one matrix: the Hessian's own memory when the caller hands it over
(7B's down_proj: 1.4 GB instead of a float64 working set of several times 2.9 GB). A Hessian that does
not factor is retried with doubled damping.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from quantizers import ggml, intgrid, linalg
from quantizers.grids import GRIDS, BlockFields, Grid, IntType, Target, grid, unpack
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


DAMP_RETRIES = 6   # doublings of the damping tried when a Hessian does not factor


def inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), which GPTQ's sweep reads row by row.

    Computed as the inverse of ``H``'s "upper-lower" factor ``R`` (``H = R R^T``, from the Cholesky of
    ``H`` with rows and columns reversed): one factorisation and one triangular inverse, half the work
    of inverting ``H`` and factoring again, and no explicit inverse of an ill-conditioned matrix.
    ``H`` is left unchanged (:func:`gptq` builds the reversed matrix itself, without this copy).
    """
    return _inverse_of_reversed_factor(H.flip(0, 1).mT.contiguous().mT)


def _inverse_of_reversed_factor(A: torch.Tensor) -> torch.Tensor:
    """:func:`inverse_cholesky` given ``A = J H J`` (``H`` reversed) in column-major order, which it
    consumes: the Cholesky factor overwrites ``A`` and the triangular solve overwrites its right-hand
    side, so at most two ``n x n`` matrices exist at once (plus any reference the caller keeps to ``A``).
    Raises ``torch.linalg.LinAlgError`` if ``A`` is not positive definite."""
    torch.linalg.cholesky(A, out=A)                  # A = L L^T; column-major, so LAPACK works in place
    R = A.flip(0, 1)                                 # upper triangular, H = R R^T
    del A
    U = torch.eye(R.shape[0], dtype=R.dtype).mT      # column-major identity: the solve overwrites it
    return torch.linalg.solve_triangular(R, U, upper=True, out=U)  # R^-1: upper, H^-1 = R^-T R^-1


def _dampings(damp: float) -> Iterator[float]:
    """Relative dampings to try in turn: ``damp``, then doubled, up to DAMP_RETRIES times. A Hessian that is
    singular or too ill-conditioned to factor (few calibration tokens for many channels, or rounding in a
    float32 factorisation) gets more damping, as GPTQModel does; the schedule is fixed, so the same
    Hessian always ends up with the same damping."""
    for k in range(DAMP_RETRIES + 1):
        yield damp * 2.0 ** k


def _not_positive_definite(name: str, damp: float) -> ValueError:
    return ValueError(f"{name}: the Hessian does not factor even with damping {damp:g} of its mean diagonal")


def _inverse_factor_f64(name: str, hessian: np.ndarray, diagonal: torch.Tensor, perm: np.ndarray | None,
                        damp: float) -> torch.Tensor:
    """:func:`inverse_cholesky` of the damped (and permuted) Hessian in float64, as float32; ``hessian`` is
    not modified. Bit for bit what GPTQ computed before large Hessians had their own route (the same LAPACK
    calls on the same matrices), with at most two float64 matrices at once instead of five."""
    for rel in _dampings(damp):
        d = _damped(diagonal, rel)
        try:  # a temporary: _inverse_of_reversed_factor frees it as soon as the factor exists
            return _inverse_of_reversed_factor(torch.from_numpy(_reversed(hessian, perm, d, np.float64))
                                               ).to(torch.float32)
        except torch.linalg.LinAlgError:
            pass
    raise _not_positive_definite(name, rel)


def _inverse_factor_f32(name: str, hessian: np.ndarray, diagonal: torch.Tensor, perm: np.ndarray | None,
                        damp: float, overwrite: bool) -> torch.Tensor:
    """:func:`inverse_cholesky` of the damped (and permuted) Hessian in float32, in one ``n x n`` matrix.

    For large Hessians (7B's down_proj: 18944 columns, 1.4 GB in float32) every copy counts, and a float64
    working set would be 2.9 GB per matrix. So: LAPACK on a column-major view, each step in place
    (``potrf`` the factor, ``trtri`` its inverse), the reversals as in-place buffer swaps. ``potrf`` writes
    one triangle only; the other still holds the Hessian, from which a failed attempt is restored for a
    retry with more damping (float32 fails to factor sooner than float64). With ``overwrite`` the
    matrix is ``hessian`` itself (the caller's last use; if it is C-contiguous float32 and not permuted),
    else one copy.
    """
    from scipy.linalg import lapack
    if overwrite and perm is None and hessian.dtype == np.float32 and hessian.flags.c_contiguous:
        a = hessian
        linalg.reverse(a)                                        # a = J H J
    else:
        a = _reversed(hessian, perm, None, np.float32)
    idx = _order(perm, len(a))
    f = a.T                       # column-major view of the symmetric a; its upper triangle is a's lower one
    for rel in _dampings(damp):
        np.fill_diagonal(a, _damped(diagonal, rel).numpy()[idx])
        f, info = lapack.spotrf(f, lower=0, clean=0, overwrite_a=1)   # f = U0^T U0, U0 in f's upper triangle
        _check_in_place(f, a, "spotrf", info)
        if info == 0:
            break
        linalg.mirror_upper(a)    # a's upper triangle still holds the Hessian: restore the lower one
    else:
        raise _not_positive_definite(name, rel)
    f, info = lapack.strtri(f, lower=0, overwrite_c=1)  # f's upper: U0^-1, so a's lower: L^-1 with L = U0^T
    _check_in_place(f, a, "strtri", info)
    if info:
        raise RuntimeError(f"{name}: strtri found a zero pivot at {info}")
    linalg.zero_upper(a)          # the rest of the Hessian
    linalg.reverse(a)             # J L^-1 J = R^-1 with R = J L J upper: H = R R^T
    return torch.from_numpy(a)


def _check_in_place(out: np.ndarray, a: np.ndarray, routine: str, info: int) -> None:
    """LAPACK through SciPy works in place only on a column-major array of its own type; anything else would
    silently compute on a copy."""
    if not np.shares_memory(out, a):
        raise RuntimeError(f"{routine} did not work in place")
    if info < 0:
        raise RuntimeError(f"{routine}: illegal value in argument {-info}")


def _order(perm: np.ndarray | None, n: int) -> np.ndarray:
    """Indices of the reversed (and permuted) matrix's rows in the original Hessian."""
    return (np.arange(n) if perm is None else perm)[::-1]


def _reversed(hessian: np.ndarray, perm: np.ndarray | None, diagonal: torch.Tensor | None, dtype) -> np.ndarray:
    """A new matrix ``J P^T H P J`` (``P`` the permutation, if any) in ``dtype``, with ``diagonal`` (of the
    unpermuted ``H``) on its diagonal when given. Built in one pass: no intermediate copies. Column-major
    for float64, which torch's Cholesky then factors in place (reading the triangle it always read, even
    of a Hessian that is symmetric only up to rounding); row-major for the float32 route, whose in-place
    helpers work on row-major matrices."""
    n = len(hessian)
    out = np.empty((n, n), dtype, order="F" if dtype == np.float64 else "C")
    idx = _order(perm, n)
    if perm is None:
        out[...] = hessian[::-1, ::-1]
    else:
        for c0 in range(0, n, 1024):                   # bounded temporaries of the fancy indexing
            out[:, c0:c0 + 1024] = hessian[np.ix_(idx, idx[c0:c0 + 1024])]
    if diagonal is not None:
        np.fill_diagonal(out, diagonal.numpy()[idx])
    return out


def _diagonal(hessian: np.ndarray) -> torch.Tensor:
    """The Hessian's diagonal in float64, dead channels (never active: 0) set to 1 (their weights are zeroed)."""
    d = torch.from_numpy(np.diag(hessian).astype(np.float64))
    d[d == 0] = 1.0
    return d


def _damped(diagonal: torch.Tensor, rel: float) -> torch.Tensor:
    """``diagonal`` plus ``rel`` times its mean (GPTQ's dampening)."""
    return diagonal + rel * torch.mean(diagonal)


def _codebook_sweep(W: torch.Tensor, Hinv: torch.Tensor, target: Target, block: int,
                    importance: np.ndarray) -> np.ndarray:
    """GPTQ for the codebook i-quants (IQ3_XXS, IQ3_S, IQ2_S): raw blocks [rows, row_bytes].

    Their values are lattice points of a codebook under a scale per super-block: no per-column nearest
    level exists to choose. So the sweep works a block at a time: ggml's own quantizer rounds the block's
    error-updated weights (Hessian diagonal as importance, as for the other types), and the block's
    rounding error is then spread over the columns not yet quantized exactly as GPTQ spreads a column's
    (column by column through the block, with its codes fixed). Why by hand: no library rounds onto these
    codebooks with error feedback; ggml rounds, this loop only feeds the error forward."""
    rows, cols = W.shape
    nbytes = ggml.row_size(int(target), block)
    out = np.empty((rows, cols // block * nbytes), dtype=np.uint8)
    for b, i1 in enumerate(range(0, cols, block)):
        i2 = i1 + block
        raw = ggml.quantize_rows(int(target), W[:, i1:i2].numpy(), importance[i1:i2])
        out[:, b * nbytes:(b + 1) * nbytes] = raw
        Q1 = torch.from_numpy(ggml.dequantize_rows(int(target), raw, block)).T.contiguous()
        W1 = W[:, i1:i2].T.contiguous()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(block):
            err = (W1[i] - Q1[i]) / Hinv1[i, i]
            W1[i:] -= Hinv1[i, i:][:, None] * err[None, :]
            Err1[i] = err
        W[:, i2:] -= Err1.T.contiguous() @ Hinv[i1:i2, i2:]
    return out


def gptq(name: str, weight: np.ndarray, hessian: np.ndarray, target: Target, *, block_size: int = 128,
         damp: float = 0.01, act_order: bool = False, overwrite_hessian: bool = False) -> QuantizedTensor:
    """Quantize ``weight`` [out, in] onto ``target`` (a GGUF block type or an integer grid) with GPTQ;
    ``hessian`` is [in, in]. With ``overwrite_hessian`` a large Hessian (see :mod:`quantizers.linalg`) may
    be factored in place, destroying it; pass it when the caller has no further use for it."""
    rows, cols = weight.shape
    codebook = not isinstance(target, IntType) and target not in GRIDS
    try:
        g = None if codebook else grid(target, cols)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    block = ggml.block_size(int(target)) if codebook else g.block
    if cols % block:
        raise ValueError(f"{name}: {cols} columns is not a multiple of {target.name}'s block {block}")
    per_channel = isinstance(target, IntType) and target.per_channel
    W = torch.tensor(weight, dtype=torch.float32)
    importance = np.clip(np.diag(hessian).astype(np.float32), 0, None)
    diagonal = _diagonal(hessian)
    W[:, torch.from_numpy(np.diag(hessian) == 0)] = 0.0
    act_order = act_order and not codebook  # a codebook block is rounded as a whole, in column order
    perm = torch.argsort(_damped(diagonal, damp), descending=True) if act_order else torch.arange(cols)
    order = perm.numpy() if act_order else None    # the factored matrix's column order, unless natural
    # float64 for the factorisation: Qwen's outlier channels give Hessians a dynamic range f32 factors
    # poorly; a large Hessian, whose float64 copies would dominate peak memory, in float32 with retries
    if linalg.is_large(cols):
        Hinv = _inverse_factor_f32(name, hessian, diagonal, order, damp, overwrite_hessian)
    else:
        Hinv = _inverse_factor_f64(name, hessian, diagonal, order, damp)
    if codebook:
        return QuantizedTensor(name, target, (rows, cols), _codebook_sweep(W, Hinv, target, block, importance))
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
        if act_order:
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
        # The sweep works on the batch transposed ([columns, rows]): each column of W, its grid parameters
        # and its codes are contiguous rows, so the per-column rounding and the rank-1 update of the
        # remaining columns stream through memory instead of striding by the row length (2-3x faster on
        # CPU). The arithmetic per element is the same as the reference's, so the codes are identical.
        W1 = W[:, i1:i2].T.contiguous()
        Err1 = torch.empty_like(W1)
        C1 = torch.empty(i2 - i1, rows, dtype=torch.uint8)
        sT, oT = scales.T.contiguous(), offsets.T.contiguous()
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            sub = int(perm[i1 + i]) // g.sub
            w = W1[i]
            code, q = _round(g, w, sT[sub], oT[sub], levels, mids)
            C1[i] = code
            err = (w - q) / Hinv1[i, i]
            W1[i:] -= Hinv1[i, i:][:, None] * err[None, :]
            Err1[i] = err
        codes[:, perm[i1:i2]] = C1.T
        W[:, i2:] -= Err1.T.contiguous() @ Hinv[i1:i2, i2:]
    merged = {k: np.concatenate([p[k] for p in params], axis=1) for k in params[0]}
    return QuantizedTensor.from_fields(name, BlockFields(g, codes.numpy(), merged))
