"""``QuantizedTensor``: the one data type that carries quantized weights from quantizers to exporters."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from quantizers import ggml, grids

FLOAT_TYPES = {T.F32: np.dtype("<f4"), T.F16: np.dtype("<f2"), T.BF16: np.dtype("<u2")}


def row_bytes(t: grids.Target, ncols: int) -> int:
    """Bytes per row of ``ncols`` values in type ``t`` (ggml's own arithmetic for GGML types)."""
    if isinstance(t, grids.IntType):
        g = grids.grid(t, ncols)
        return ncols // g.block * g.bytes_per_block
    return ggml.row_size(int(t), ncols)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (uint16), as ggml_fp32_to_bf16 does (NaN kept quiet)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 64).astype(np.uint16), rounded)


@dataclass
class QuantizedTensor:
    """Rows ``[row0, row0 + rows)`` of a weight, stored exactly as the runtime reads them.

    ``data`` is the canonical form: block bytes ([rows, row_bytes] uint8; ggml's for GGML types) or the
    typed array for F32/F16/BF16. :meth:`fields` unpacks codes and per-block scales/offsets,
    :meth:`dequantize` returns the float32 values the runtime computes from those bytes.
    """
    name: str
    type: grids.Target          # a GGML type, or an integer grid (grids.IntType) for ONNX / OpenVINO
    shape: tuple[int, int]      # logical [rows, cols] of this piece (PyTorch [out, in] order)
    data: np.ndarray
    row0: int = 0

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def grid(self) -> grids.Grid:
        return grids.grid(self.type, self.shape[1])

    def fields(self) -> grids.BlockFields:
        return grids.unpack(self.grid, self.data, self.shape[1])

    @classmethod
    def from_fields(cls, name: str, f: grids.BlockFields, row0: int = 0) -> "QuantizedTensor":
        return cls(name, f.grid.type, f.codes.shape, grids.pack(f), row0)

    def dequantize(self) -> np.ndarray:
        if self.type == T.F32:
            return self.data.astype(np.float32).reshape(self.shape)
        if self.type == T.F16:
            return self.data.astype(np.float32).reshape(self.shape)
        if self.type == T.BF16:
            return (self.data.astype(np.uint32) << 16).view(np.float32).reshape(self.shape)
        if isinstance(self.type, grids.IntType):
            return grids.dequantize_fields(self.fields())
        return ggml.dequantize_rows(int(self.type), self.data, self.shape[1]).reshape(self.shape)
