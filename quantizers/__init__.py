"""Quantizers: functions of (weight, calibration statistics, target grid) -> QuantizedTensor.

``QUANTIZERS`` is the one registry; the pipeline looks methods up here by name. A :class:`Method` is data plus
two hooks the calibration engine calls, so the engine never branches on a method's name:

- the statistics it needs: the input's per-channel mean square always (the imatrix), the full Hessian
  ``x x^T`` if ``hessian`` (GPTQ), a sample of raw inputs if ``samples`` (AWQ's scale search);
- ``transform_layer(view)``: may change a layer before it is quantized (AWQ folds channel scales), default none;
- ``quantize(name, weight [out, in] float32, target type, stats)`` where ``stats`` is the layer input's
  :class:`CalibStats` (``None`` for data-free methods).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompile.errors import UsageError
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
    from quantizers.gptq import (
        gptq,  # imports torch: only when a calibrated run needs it
    )
    return gptq(name, weight, stats.hessian, target, overwrite_hessian=stats.last_use)


def _imatrix(name: str, weight: np.ndarray, target: Target, stats: CalibStats | None) -> QuantizedTensor:
    return rtn.quantize(name, weight, target, importance=stats.importance)


def _no_transform(view) -> None:
    """The default layer hook: the layer is quantized as it is."""


def _awq_transform(view) -> None:
    from quantizers import awq  # imports torch: only when an AWQ run needs it
    awq.transform_layer(view)


@dataclass(frozen=True)
class Method:
    name: str
    quantize: Callable[[str, np.ndarray, Target, CalibStats | None], QuantizedTensor]
    needs_calibration: bool
    help: str
    hessian: bool = False   # needs the full input Hessian x x^T (GPTQ), not only its diagonal
    samples: bool = False   # needs a sample of the raw inputs (AWQ's scale search)
    # called by the layer engine between the statistics pass and quantization (calibration.capture.LayerView)
    transform_layer: Callable[[Any], None] = _no_transform


QUANTIZERS: dict[str, Method] = {m.name: m for m in (
    Method("rtn", lambda n, w, t, s: rtn.quantize(n, w, t), False,
           "round to nearest with ggml's own scale search (= llama-quantize)"),
    Method("imatrix", _imatrix, True,
           "round to nearest, scales weighted by calibration activations (= llama-quantize --imatrix)"),
    Method("gptq", _gptq, True, "GPTQ error compensation on the exact target grid", hessian=True),
    Method("awq", _imatrix, True, "AWQ channel scales folded into the model, then imatrix-weighted rounding",
           samples=True, transform_layer=_awq_transform),
    Method("awq+gptq", _gptq, True, "AWQ channel scales, then GPTQ on the exact target grid",
           hessian=True, samples=True, transform_layer=_awq_transform),
)}


def get(method: str) -> Method:
    try:
        return QUANTIZERS[method]
    except KeyError:
        raise UsageError(f"unknown quantization method {method!r}; available: {', '.join(QUANTIZERS)}") from None


__all__ = ["QUANTIZERS", "CalibStats", "Method", "QuantizedTensor", "get"]
