"""Quantized tensors parked on disk and memory-mapped back, so a whole model's worth of them is never
held in anonymous memory.

The GGUF target streams each tensor into the file as it is made. The ONNX and OpenVINO targets build
their graph only once every linear is quantized, so until then the tensors wait somewhere: in RAM that is
the whole quantized model (4.5 GB for a 7B at 4 bits). Here each waits in a ``.npy`` file in a hidden
folder of the output directory and comes back as a read-only memory map: its pages belong to the page
cache, which the kernel drops and re-reads as needed. (numpy's ``.npy`` + ``mmap_mode`` already is that
store; this module only names the files and removes the folder.)
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from quantizers.tensor import QuantizedTensor


class Spill:
    """A folder of memory-mapped arrays; :meth:`close` removes it (also on errors: use as a context manager)."""

    def __init__(self, folder: Path):
        self.folder = folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self._n = 0
        self._held: list[np.ndarray] = []   # arrays others may point into without a reference (see empty)

    def _path(self) -> Path:
        self._n += 1
        return self.folder / f"{self._n:06d}.npy"

    def array(self, a: np.ndarray) -> np.ndarray:
        """``a`` written to disk, returned as a read-only memory map of the same dtype and shape."""
        path = self._path()
        np.save(path, np.ascontiguousarray(a))
        return np.load(path, mmap_mode="r")

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A new writable memory-mapped array on disk (filled by the caller, e.g. row chunk by row chunk).
        The spill keeps it mapped until :meth:`close`: an OpenVINO Constant made with ``shared_memory``
        points into it without holding a Python reference."""
        a = np.lib.format.open_memmap(self._path(), mode="w+", dtype=dtype, shape=shape)
        self._held.append(a)
        return a

    def put(self, qt: QuantizedTensor) -> QuantizedTensor:
        """``qt`` with its bytes on disk instead of in memory."""
        return dataclasses.replace(qt, data=self.array(qt.data))

    def close(self) -> None:
        self._held.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
