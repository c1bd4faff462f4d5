"""Quantizers: functions of (weight, calibration statistics, target grid) -> QuantizedTensor.

``QUANTIZERS`` is the one registry; the pipeline looks methods up here by name. Each entry takes
``(name, weight [out, in] float32, target type, stats)`` where ``stats`` is the layer input's
:class:`CalibStats` (``None`` for data-free methods).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quantizers import rtn
from quantizers.grids import Target
from quantizers.tensor import QuantizedTensor


@dataclass
class CalibStats:
    """Input statistics of one linear over the calibration tokens: the mean of x x^T (only for methods
    that need it) and the mean of x^2 per channel. ``last_use``: the holder hands ``hessian`` over for good,
    so a quantizer may overwrite it (GPTQ factors a large Hessian in place instead of in a copy)."""
    hessian: np.ndarray | None
    sq_mean: np.ndarray
    last_use: bool = False

    @property
    def importance(self) -> np.ndarray:
        """Per-input-channel mean squared activation (llama.cpp's imatrix)."""
        return np.clip(self.sq_mean, 0, None).astype(np.float32)

    def rescale(self, s: np.ndarray) -> None:
        """In place, the statistics of the inputs ``x / s`` (after AWQ folded ``s`` into the weights).

        The Hessian is divided by ``s s^T`` a band of rows at a time: no second copy of it, nor of
        ``s s^T`` (each 1.4 GB at 7B's widest input in float32), and the same arithmetic per element."""
        if self.hessian is not None:
            rows = max(1, (1 << 22) // len(s))
            for r0 in range(0, len(s), rows):
                self.hessian[r0:r0 + rows] /= np.outer(s[r0:r0 + rows], s)
        self.sq_mean = (self.sq_mean / (s * s)).astype(np.float32)


def _gptq(name: str, weight: np.ndarray, target: Target, stats: CalibStats | None) -> QuantizedTensor:
    from quantizers.gptq import gptq  # imports torch: only when a calibrated run needs it
    return gptq(name, weight, stats.hessian, target, overwrite_hessian=stats.last_use)


def _imatrix(name: str, weight: np.ndarray, target: Target, stats: CalibStats | None) -> QuantizedTensor:
    return rtn.quantize(name, weight, target, importance=stats.importance)


@dataclass(frozen=True)
class Method:
    name: str
    quantize: Callable[[str, np.ndarray, Target, CalibStats | None], QuantizedTensor]
    needs_calibration: bool
    help: str
    hessian: bool = False   # needs the full input Hessian x x^T (GPTQ), not only its diagonal
    awq: bool = False       # search and fold AWQ scales before quantizing


QUANTIZERS: dict[str, Method] = {m.name: m for m in (
    Method("rtn", lambda n, w, t, s: rtn.quantize(n, w, t), False,
           "round to nearest with ggml's own scale search (= llama-quantize)"),
    Method("imatrix", _imatrix, True,
           "round to nearest, scales weighted by calibration activations (= llama-quantize --imatrix)"),
    Method("gptq", _gptq, True, "GPTQ error compensation on the exact target grid", hessian=True),
    Method("awq", _imatrix, True, "AWQ channel scales folded into the model, then imatrix-weighted rounding",
           awq=True),
    Method("awq+gptq", _gptq, True, "AWQ channel scales, then GPTQ on the exact target grid",
           hessian=True, awq=True),
)}


def get(method: str) -> Method:
    try:
        return QUANTIZERS[method]
    except KeyError:
        raise KeyError(f"unknown quantization method {method!r}; available: {', '.join(QUANTIZERS)}") from None


__all__ = ["QUANTIZERS", "CalibStats", "Method", "QuantizedTensor", "get"]
