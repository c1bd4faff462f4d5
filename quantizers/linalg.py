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

# ---- bfloat16 or float32 for the calibration passes ----------------------------------------------------
# The layer engine's passes, the sensitivity analysis and AWQ's search multiply in bfloat16 where that is
# fast: 3x float32's throughput on CPUs with AVX512-BF16 / AMX and on GPUs. On a CPU without them (AVX2
# only, e.g. AMD Zen 2/3 and most laptops) torch's bfloat16 matmul is an emulation: 1 GFLOP/s against
# float32's 80 on a 2-core AVX2 VM, which turned a 3-minute --bits 4 run into hours. So the choice is made
# per machine, from the CPU's flags (deterministic for a machine, unlike a timing probe); artifacts of
# calibrated methods then differ in the last bits between CPU families. QCOMPILE_COMPUTE_DTYPE=bfloat16 or
# float32 pins it (the same bytes on both kinds of machine).
_FAST_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
COMPUTE_DTYPE_ENV = "QCOMPILE_COMPUTE_DTYPE"


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo", encoding="ascii", errors="replace").read()
    except OSError:      # not Linux: no flags to read, float32 (no claim made about other platforms)
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def bf16_is_fast(device: str = "cpu") -> bool:
    """Whether the calibration passes on ``device`` ("cpu", "cuda", "cuda:1") multiply in bfloat16."""
    import os
    pinned = os.environ.get(COMPUTE_DTYPE_ENV, "").strip().lower()
    if pinned:
        if pinned not in ("bfloat16", "float32"):
            raise ValueError(f"{COMPUTE_DTYPE_ENV}={pinned!r}: expected bfloat16 or float32")
        return pinned == "bfloat16"
    if str(device).startswith("cuda"):
        return True   # every GPU torch's CUDA build targets multiplies bfloat16 natively or at float32's speed
    return _cpu_bf16()


_CPU_BF16: bool | None = None


def _cpu_bf16() -> bool:
    global _CPU_BF16
    if _CPU_BF16 is None:
        _CPU_BF16 = bool(_cpu_flags() & _FAST_BF16_FLAGS)
    return _CPU_BF16


def compute_dtype(device: str = "cpu") -> str:
    """The torch dtype name the calibration passes on ``device`` run in (:func:`bf16_is_fast`)."""
    return "bfloat16" if bf16_is_fast(device) else "float32"


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


# ---- X^T X from bfloat16 activations, accumulated in float32 -------------------------------------------
# The layer engine runs in bfloat16, so the inputs whose Gram matrix GPTQ needs are bfloat16 values. torch
# has no CPU matmul with bfloat16 inputs and a float32 result (its bf16 matmul rounds the output to bf16,
# which breaks the positive-definiteness of near-singular Hessians), and NumPy's OpenBLAS is built without
# bfloat16. MKL's cblas_gemm_bf16bf16f32, which libtorch_cpu links in and exports, is exactly that product
# (AMX / AVX512-BF16 on CPUs that have them: 3-5x NumPy's float32 syrk on 7B's widths here). A product of
# two bfloat16 values is exact in float32, so this is the same sum as the float32 product in another order.

_GEMM_BF16 = None   # the ctypes function once checked, or False where unavailable


def _gemm_bf16():
    global _GEMM_BF16
    if _GEMM_BF16 is None:
        _GEMM_BF16 = False
        try:
            import ctypes
            import os

            import torch
            lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
            f = lib.cblas_gemm_bf16bf16f32
        except (OSError, AttributeError, ImportError):
            return False
        f.restype = None
        f.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                           ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
        _GEMM_BF16 = f
        if not _self_check():   # an MKL with another integer ABI would compute garbage: never use it then
            _GEMM_BF16 = False
    return _GEMM_BF16


def _self_check() -> bool:
    import torch
    x = torch.linspace(-3, 3, 37 * 24).reshape(37, 24).to(torch.bfloat16)
    h = np.zeros((24, 24), np.float32)
    _call(h, x)
    xf = x.float().numpy().astype(np.float64)
    return bool(np.allclose(h, xf.T @ xf, rtol=1e-5, atol=1e-5))


def _call(h: np.ndarray, x) -> None:
    tokens, n = x.shape
    # row-major (101): h = 1 * x^T (112: transposed) x (111: as is) + 1 * h
    _GEMM_BF16(101, 112, 111, n, n, tokens, 1.0, x.data_ptr(), n, x.data_ptr(), n, 1.0, h.ctypes.data, n)


def can_add_gram_bf16(x) -> bool:
    """Whether :func:`add_gram_bf16` can take ``x`` (a CPU bfloat16 tensor, where MKL's kernel exists)."""
    import torch
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and bool(_gemm_bf16())


def add_gram_bf16(h: np.ndarray, x) -> None:
    """``h += x^T x`` in place for float32 ``h`` [n, n] (C-contiguous) and a bfloat16 torch tensor ``x``
    [tokens, n], accumulated in float32, both triangles (no temporary)."""
    if not (h.flags.c_contiguous and h.dtype == np.float32 and h.shape == (x.shape[1], x.shape[1])):
        raise ValueError("add_gram_bf16 needs a C-contiguous float32 [n, n] matrix")
    _call(h, x.contiguous())
