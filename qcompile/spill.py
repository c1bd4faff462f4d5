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

import contextlib
import dataclasses
import mmap
import shutil
import threading
from pathlib import Path

import numpy as np

from quantizers.tensor import QuantizedTensor


def release(a: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped array from this process (a no-op for an ordinary array).

    Pages of a file mapping that the process wrote or read stay in its resident set until the kernel needs
    the memory; this drops them now, so RSS shows what the run holds, not the page cache it passed
    through. Nothing is lost: a shared file mapping's pages live on in the page cache (written back if
    dirty) and fault back in on the next access."""
    m = getattr(a, "_mmap", None)
    if m is not None and not m.closed:
        m.madvise(mmap.MADV_DONTNEED)


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

    @contextlib.contextmanager
    def trimmed(self, period: float = 0.5):
        """While the block runs, drop this spill's mapped pages from the resident set every ``period``
        seconds (:func:`release`). For a library that reads the arrays from its own threads, e.g.
        OpenVINO's ``save_model`` streaming a 7B's 4.4 GB of codes out to the IR: the pages it has passed
        fall back to the page cache instead of piling up in RSS; any it needs again fault back in."""
        stop = threading.Event()

        def trim() -> None:
            while not stop.wait(period):
                for a in list(self._held):
                    release(a)
        t = threading.Thread(target=trim, daemon=True, name="spill-trim")
        t.start()
        try:
            yield self
        finally:
            stop.set()
            t.join()

    def close(self) -> None:
        self._held.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
