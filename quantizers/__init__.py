"""Quantizers: functions of (weight, calibration statistics, target grid) -> QuantizedTensor.

``QUANTIZERS`` is the one registry; the pipeline looks methods up here by name. Each entry takes
``(name, weight [out, in] float32, target type, stats)`` where ``stats`` is the layer input's
:class:`CalibStats` (``None`` for data-free methods).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from quantizers import rtn
from quantizers.tensor import QuantizedTensor


@dataclass
class CalibStats:
    """Input statistics of one linear: the mean of x x^T over calibration tokens."""
    hessian: np.ndarray

    @property
    def importance(self) -> np.ndarray:
        """Per-input-channel mean squared activation (llama.cpp's imatrix)."""
        return np.clip(np.diag(self.hessian), 0, None).astype(np.float32)


def _gptq(name: str, weight: np.ndarray, target: T, stats: CalibStats | None) -> QuantizedTensor:
    from quantizers.gptq import gptq  # imports torch: only when a calibrated run needs it
    return gptq(name, weight, stats.hessian, target)


@dataclass(frozen=True)
class Method:
    name: str
    quantize: Callable[[str, np.ndarray, T, CalibStats | None], QuantizedTensor]
    needs_calibration: bool
    help: str


QUANTIZERS: dict[str, Method] = {m.name: m for m in (
    Method("rtn", lambda n, w, t, s: rtn.quantize(n, w, t), False,
           "round to nearest with ggml's own scale search (= llama-quantize)"),
    Method("imatrix", lambda n, w, t, s: rtn.quantize(n, w, t, importance=s.importance), True,
           "round to nearest, scales weighted by calibration activations (= llama-quantize --imatrix)"),
    Method("gptq", _gptq, True,
           "GPTQ error compensation on the exact target grid"),
)}


def get(method: str) -> Method:
    try:
        return QUANTIZERS[method]
    except KeyError:
        raise KeyError(f"unknown quantization method {method!r}; available: {', '.join(QUANTIZERS)}") from None


__all__ = ["QUANTIZERS", "CalibStats", "Method", "QuantizedTensor", "get"]
