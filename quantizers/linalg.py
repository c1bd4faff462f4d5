"""In-place operations on large symmetric float32 matrices (calibration Hessians), without a second copy.

A 7B model's widest Hessian (``down_proj``'s input, 18944 channels) is 1.4 GB in float32; every
temporary copy of it (a transpose, a flip, a product before it is added) costs as much again. Hessians
wider than :data:`LARGE_HESSIAN` columns are therefore accumulated, normalised and factored in float32,
in place; narrower ones keep the simpler code paths (and the float64 factorisation) they always had, so
artifacts of models whose Hessians are all narrow stay bit-identical.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Columns above which a Hessian is "large". Qwen2.5 up to 3B (widest: 11008) and Qwen3 up to 4B (9728)
# stay below; Qwen2.5-7B's down_proj (18944) and Qwen3-8B's (12288) are above. At this width GPTQ's float64
# route holds two 8 * cols^2 byte matrices plus the float32 Hessian: 2.4 GB. A fixed number, never derived
# from the machine's free memory: the artifact must not depend on where it was made.
LARGE_HESSIAN = 11264

_CHUNK = 1 << 22   # elements moved per step of an in-place pass (16 MB of float32)


def is_large(cols: int) -> bool:
    """Whether a ``cols`` x ``cols`` Hessian takes the float32, in-place paths (read at call time, so a test
    can lower :data:`LARGE_HESSIAN`)."""
    return cols > LARGE_HESSIAN


def _blocks(n: int) -> Iterator[tuple[int, int]]:
    """Block boundaries along one side of a matrix for blocked passes (square blocks of _CHUNK elements)."""
    b = int(np.sqrt(_CHUNK))
    for r0 in range(0, n, b):
        yield r0, min(r0 + b, n)


def reverse(a: np.ndarray) -> None:
    """``a <- J a J`` in place (rows and columns reversed, ``J`` the exchange matrix): for a C-contiguous
    matrix that is its flat buffer reversed, swapped chunk by chunk from both ends."""
    flat = a.reshape(-1)
    if not np.shares_memory(flat, a):
        raise ValueError("reverse() needs a contiguous matrix")
    n, half = flat.size, flat.size // 2
    for i in range(0, half, _CHUNK):
        j = min(i + _CHUNK, half)
        lo, hi = flat[i:j], flat[n - j:n - i]
        tmp = lo.copy()
        lo[:] = hi[::-1]
        hi[:] = tmp[::-1]


def mirror_upper(a: np.ndarray) -> None:
    """Copy the strict upper triangle of square ``a`` onto its strict lower triangle, in place, block by
    block (symmetric again after an operation that wrote only the lower one, or only the upper one)."""
    n = a.shape[0]
    for r0, r1 in _blocks(n):
        for c0, c1 in _blocks(r0):       # blocks left of the diagonal
            a[r0:r1, c0:c1] = a[c0:c1, r0:r1].T
        d = a[r0:r1, r0:r1]
        lower = np.tril_indices(r1 - r0, -1)
        d[lower] = d.T[lower]


def zero_upper(a: np.ndarray) -> None:
    """Set the strict upper triangle of square ``a`` to zero, in place."""
    n = a.shape[0]
    for r0, r1 in _blocks(n):
        a[r0:r1, r1:] = 0
        d = a[r0:r1, r0:r1]
        d[np.triu_indices(r1 - r0, 1)] = 0


def add_gram_upper(h: np.ndarray, x: np.ndarray) -> None:
    """``h += x^T x`` in place for float32 ``h`` [n, n] (C-contiguous) and ``x`` [tokens, n], updating only
    ``h``'s upper triangle (BLAS syrk with beta = 1: half the FLOPs of a full product and no n x n
    temporary). :func:`mirror_upper` makes ``h`` symmetric once all batches are in."""
    from scipy.linalg.blas import ssyrk
    x = np.ascontiguousarray(x, dtype=np.float32)
    # Fortran views: h.T is h (symmetric) in column-major order, its lower triangle is h's upper one;
    # x.T is x^T column-major, so syrk's ``A A^T`` is x^T x
    out = ssyrk(1.0, x.T, beta=1.0, c=h.T, trans=0, lower=1, overwrite_c=1)
    if not np.shares_memory(out, h):
        raise RuntimeError("ssyrk did not update the Hessian in place")
