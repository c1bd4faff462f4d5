"""Quantizers: functions of (weight, calibration statistics, target grid) -> QuantizedTensor.

``QUANTIZERS`` is the one registry; the pipeline looks methods up here by name.
"""
from __future__ import annotations

from typing import Callable

from quantizers import rtn
from quantizers.tensor import QuantizedTensor

Quantizer = Callable[..., QuantizedTensor]

QUANTIZERS: dict[str, Quantizer] = {
    "rtn": rtn.quantize,
}


def get(method: str) -> Quantizer:
    try:
        return QUANTIZERS[method]
    except KeyError:
        raise KeyError(f"unknown quantization method {method!r}; available: {', '.join(QUANTIZERS)}") from None


__all__ = ["QUANTIZERS", "QuantizedTensor", "get"]
