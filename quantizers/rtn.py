"""Round-to-nearest onto a target grid, done by ggml's own quantizers.

For GGUF block types this is exactly llama-quantize's search (K-quant scale/min fitting, IQ4 grids);
an optional per-column importance vector (llama.cpp's imatrix: mean squared activation per input
channel) weights that search toward the columns that matter.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from quantizers import ggml, intgrid
from quantizers.grids import IntType, Target
from quantizers.tensor import FLOAT_TYPES, QuantizedTensor, f32_to_bf16


def quantize(name: str, weight: np.ndarray, target: Target, importance: np.ndarray | None = None,
             row0: int = 0, threads: int | None = None) -> QuantizedTensor:
    """Quantize float32 rows ``weight`` ([rows, cols]; 1-D is one row) onto ``target``."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    shape = (1, w.shape[0]) if w.ndim == 1 else w.shape
    w2 = w.reshape(shape)
    if target in FLOAT_TYPES:
        if target == T.F32:
            data = w2
        elif target == T.F16:
            data = w2.astype(np.float16)
        else:
            data = f32_to_bf16(w2)
        return QuantizedTensor(name, target, shape, data, row0)
    if isinstance(target, IntType):
        return QuantizedTensor.from_fields(name, intgrid.fit(target, w2, importance), row0)
    if ggml.requires_imatrix(int(target)) and importance is None:
        raise ValueError(f"{target.name} needs an importance matrix (imatrix)")
    return QuantizedTensor(name, target, shape, ggml.quantize_rows(int(target), w2, importance, threads), row0)
