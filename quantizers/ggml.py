"""ctypes binding to ggml's own block quantizers (``libggml-base.so`` from ``libggml-python``).

Why ctypes and not Python: llama.cpp's K-quant and IQ4 scale searches are intricate, and a
re-derivation in NumPy/torch runs ~100x slower and drifts from what ``llama-quantize`` writes.
``ggml_quantize_chunk`` *is* llama-quantize's quantizer, bit for bit, accepts per-column importance
weights (imatrix), and releases the GIL, so row chunks run on every core.
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

_LOCK = threading.Lock()


class _TypeTraits(ctypes.Structure):
    # mirrors `struct ggml_type_traits` in ggml.h
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def _library_path() -> Path:
    try:
        import libggml
    except ImportError as e:  # pragma: no cover - a hard dependency
        raise RuntimeError("the 'libggml-python' package is required (pip install libggml-python)") from e
    root = Path(libggml.__file__).parent
    for sub in ("lib64", "lib"):
        for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
            p = root / sub / name
            if p.exists():
                return p
    raise RuntimeError(f"libggml-base shared library not found under {root}")


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    """Load ``libggml-base`` once and declare the signatures we use."""
    so = ctypes.CDLL(str(_library_path()))
    so.ggml_quantize_init.argtypes = [ctypes.c_int]
    so.ggml_quantize_init.restype = None
    so.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    so.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    so.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                       ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    so.ggml_quantize_chunk.restype = ctypes.c_size_t
    so.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    so.ggml_row_size.restype = ctypes.c_size_t
    so.ggml_get_type_traits.argtypes = [ctypes.c_int]
    so.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    so.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    so.ggml_validate_row_data.restype = ctypes.c_bool
    return so


def row_size(type_id: int, n_per_row: int) -> int:
    """Bytes that one row of ``n_per_row`` values takes in ggml type ``type_id``."""
    return int(lib().ggml_row_size(type_id, n_per_row))


def block_size(type_id: int) -> int:
    """Values per block of ggml type ``type_id`` (256 for the K-quants and the IQ2/IQ3 codebooks)."""
    return int(lib().ggml_get_type_traits(type_id).contents.blck_size)


def requires_imatrix(type_id: int) -> bool:
    return bool(lib().ggml_quantize_requires_imatrix(type_id))


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def quantize_rows(type_id: int, rows: np.ndarray, imatrix: np.ndarray | None = None,
                  threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Quantize a 2-D float32 array row by row with ggml; returns the raw block bytes (uint8, [nrows, row_bytes]).

    ``imatrix`` holds one importance weight per column (llama.cpp's imatrix); rows are split into
    chunks that run on ``threads`` threads (ctypes drops the GIL during the C call).
    """
    so = lib()
    src = np.ascontiguousarray(rows, dtype=np.float32)
    if src.ndim != 2:
        raise ValueError("quantize_rows expects a 2-D array")
    nrows, n_per_row = src.shape
    rsize = row_size(type_id, n_per_row)
    if out is None:
        out = np.empty((nrows, rsize), dtype=np.uint8)
    imat = None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imat.shape != (n_per_row,):
            raise ValueError(f"imatrix must have {n_per_row} entries, got {imat.shape}")
    with _LOCK:  # table initialisation is the one step that is not re-entrant across types
        so.ggml_quantize_init(type_id)
    threads = threads or default_threads()
    # ggml_quantize_chunk's `start` is an element offset that must fall on a row boundary
    step = max(1, -(-nrows // (threads * 4)))
    imat_ptr = imat.ctypes.data if imat is not None else None

    def work(r0: int) -> int:
        n = min(step, nrows - r0)
        return so.ggml_quantize_chunk(type_id, src.ctypes.data, out.ctypes.data, r0 * n_per_row, n, n_per_row, imat_ptr)

    starts = range(0, nrows, step)
    if threads == 1 or len(starts) == 1:
        written = sum(work(r) for r in starts)
    else:
        with ThreadPoolExecutor(threads) as pool:
            written = sum(pool.map(work, starts))
    if written != nrows * rsize:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {nrows * rsize}")
    return out


def dequantize_rows(type_id: int, data: np.ndarray, n_per_row: int) -> np.ndarray:
    """Decode raw block bytes to float32 with ggml's own ``to_float`` (what the CPU backend computes)."""
    traits = lib().ggml_get_type_traits(type_id).contents
    if not traits.to_float:
        raise ValueError(f"ggml type {type_id} has no to_float")
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    rsize = row_size(type_id, n_per_row)
    if raw.size % rsize:
        raise ValueError("byte count is not a whole number of rows")
    nrows = raw.size // rsize
    out = np.empty((nrows, n_per_row), dtype=np.float32)
    _TO_FLOAT(traits.to_float)(raw.ctypes.data, out.ctypes.data, nrows * n_per_row)
    return out


def validate_rows(type_id: int, data: np.ndarray) -> bool:
    """ggml's own sanity check of block data (NaN/Inf scales and the like)."""
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    return bool(lib().ggml_validate_row_data(type_id, raw.ctypes.data, raw.size))
