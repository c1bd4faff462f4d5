"""The ``mmproj`` GGUF of a multimodal checkpoint's vision tower, next to the text GGUF (llama.cpp's
``llama-mtmd-cli`` / ``llama-server --mmproj``, LM Studio, Ollama).

Written as llama.cpp's converter writes ``--mmproj``: 1-D tensors and the position embedding F32, the patch
embedding F16 (F32 beside a Q8_0 file), every other matrix in the chosen type (F16, or Q8_0 where its rows
divide into Q8_0 blocks, else F16). One tensor in memory at a time; the caller renames the file into place.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType
from gguf import GGMLQuantizationType as T

from qcompile.model import Checkpoint
from qcompile.model.vision import VisionPiece, VisionTower
from quantizers import rtn
from quantizers.tensor import row_bytes

TYPES = {"f16": (T.F16, LlamaFileType.MOSTLY_F16), "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0)}


def _data(ckpt: Checkpoint, piece: VisionPiece) -> np.ndarray:
    a = ckpt.read(piece.source)
    return a[:, :, piece.temporal] if piece.temporal is not None else a   # Conv3d [out, in, t, h, w] -> one t


def _type(name: str, shape: tuple[int, ...], base: T) -> T:
    if len(shape) <= 1 or name == "v.position_embd.weight":
        return T.F32
    if name.startswith("v.patch_embd."):
        return T.F16 if base == T.F16 else T.F32
    return base if shape[-1] % 32 == 0 or base == T.F16 else T.F16


def _encode(name: str, a: np.ndarray, t: T) -> np.ndarray:
    if t == T.F32:
        return a.astype(np.float32)
    if t == T.F16:
        return a.astype(np.float16)
    return rtn.quantize(name, a.reshape(-1, a.shape[-1]), t).data.reshape(*a.shape[:-1], -1)


def write_mmproj(path: Path, ckpt: Checkpoint, tower: VisionTower, kind: str, name: str) -> int:
    """Write the tower's mmproj GGUF (``kind``: f16 or q8_0) to ``path``; returns its size in bytes."""
    base, ftype = TYPES[kind]
    pieces = tower.pieces(list(ckpt.entries))
    w = GGUFWriter(path=None, arch="clip")
    w.add_type("mmproj")
    w.add_name(name)
    w.add_quantized_by("qcompile")
    w.add_file_type(int(ftype))
    tower.add_gguf_hparams(w)
    plan = []
    for p in pieces:   # shapes and types first: the tensor table precedes the data
        e = ckpt.entry(p.source)
        shape = tuple(e.shape[:2] + e.shape[3:]) if p.temporal is not None else tuple(e.shape)
        t = _type(p.name, shape, base)
        byte_shape = (*shape[:-1], row_bytes(t, shape[-1]))   # gguf-py turns the last dimension back into values
        plan.append((p, t))
        w.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape, dtype=np.int64)),
                          raw_dtype=t)
    try:
        w.write_header_to_file(path=path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p, t in plan:
            w.write_tensor_data(np.ascontiguousarray(_encode(p.name, _data(ckpt, p), t)).view(np.uint8))
    finally:
        w.close()
    return path.stat().st_size
