"""Weight-reconstruction error per tensor: ``||W - deq(Q(W))||_F / ||W||_F``, summed chunk by chunk.

The pipeline measures each tensor where it is quantized, on the float rows that are in memory for the
quantizer anyway, so the report gets a per-tensor error without loading the model a second time.
"""
from __future__ import annotations

import numpy as np

from quantizers.tensor import QuantizedTensor


class ErrorTally:
    """Squared error and squared norm per tensor name, accumulated over the row-chunks of each tensor."""

    def __init__(self) -> None:
        self._sums: dict[str, tuple[float, float]] = {}

    def add(self, name: str, weight: np.ndarray, q: QuantizedTensor, deq: np.ndarray | None = None) -> None:
        """Add one chunk: float rows ``weight`` and their quantized form ``q`` (``deq``: ``q`` already
        dequantized, when the caller has it)."""
        w = np.asarray(weight, dtype=np.float32).reshape(-1)
        d = (q.dequantize() if deq is None else np.array(deq, dtype=np.float32)).reshape(-1)
        d -= w
        # float32 dot products per chunk (BLAS), float64 across chunks: plenty for a relative error
        err2, ref2 = self._sums.get(name, (0.0, 0.0))
        self._sums[name] = (err2 + float(np.dot(d, d)), ref2 + float(np.dot(w, w)))

    def put(self, name: str, sums: tuple[float, float]) -> None:
        """Set a tensor's (squared error, squared norm), e.g. as measured elsewhere and saved."""
        self._sums[name] = (float(sums[0]), float(sums[1]))

    def take(self, other: ErrorTally, name: str, as_name: str | None = None) -> None:
        """Copy ``other``'s measurement of ``name`` (if it has one), stored as ``as_name``."""
        if name in other._sums:
            self._sums[as_name or name] = other._sums[name]

    def sums(self, name: str) -> tuple[float, float] | None:
        return self._sums.get(name)

    def rel_error(self, name: str) -> float | None:
        """``||W - Wq||_F / ||W||_F``; None when not measured (or undefined: a zero tensor changed)."""
        s = self._sums.get(name)
        if s is None:
            return None
        err2, ref2 = s
        if ref2 == 0.0:
            return 0.0 if err2 == 0.0 else None
        return float(np.sqrt(err2 / ref2))
