"""GGUF exporter (llama.cpp, Ollama, LM Studio) on gguf-py's ``GGUFWriter``.

It lays out tensors it is given; it never quantizes. Tensor data is streamed: the header and tensor
table are written from the plan, then each tensor's row-chunks are appended as they arrive, so the
writer holds one chunk at a time, not the model.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUF_DEFAULT_ALIGNMENT, GGUFWriter, RopeScalingType
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from qcompile.arch import ModelConfig
from qcompile.tokenizer import Vocab
from quantizers.tensor import QuantizedTensor, row_bytes


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its source name, GGUF name, logical shape (PyTorch order) and type."""
    source: str
    name: str
    shape: tuple[int, ...]
    type: T

    @property
    def nbytes(self) -> int:
        rows = int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1
        return rows * row_bytes(self.type, self.shape[-1])


class _ChunkedTensor:
    """Quacks like the ndarray ``GGUFWriter.write_tensor_data`` expects (``nbytes``, ``tofile``) but
    writes the tensor chunk by chunk, so a 600 MB embedding never sits in memory whole."""

    def __init__(self, planned: PlannedTensor, chunks: Iterable[QuantizedTensor], on_chunk: Callable[[int], None]):
        self.nbytes = planned.nbytes
        self._planned, self._chunks, self._on_chunk = planned, chunks, on_chunk

    def tofile(self, f) -> None:
        p, written, next_row = self._planned, 0, 0
        for qt in self._chunks:
            if qt.type != p.type or qt.shape[-1] != p.shape[-1] or qt.row0 != next_row:
                raise RuntimeError(f"{p.name}: got {qt.type.name} rows {qt.row0}.., planned {p.type.name} row {next_row}")
            qt.data.tofile(f)
            written += qt.nbytes
            next_row += qt.shape[0]
            self._on_chunk(qt.nbytes)
        if written != self.nbytes:
            raise RuntimeError(f"{p.name}: wrote {written} bytes, planned {self.nbytes}")


def _add_hparams(w: GGUFWriter, cfg: ModelConfig) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.arch.qk_norm or cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type") or rs.get("type")
    if kind == "yarn" and "factor" in rs:
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs.get("original_max_position_embeddings", cfg.max_position_embeddings)))
    elif kind == "linear" and "factor" in rs:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))


def _add_vocab(w: GGUFWriter, vocab: Vocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    vocab.special.add_to_gguf(w, quiet=True)
    w.add_add_bos_token(False)


def _writer(cfg: ModelConfig, vocab: Vocab, plan: list[PlannedTensor], *, name: str, size_label: str,
            file_type: LlamaFileType, extra: dict[str, str] | None = None) -> GGUFWriter:
    """A writer holding the file's metadata and tensor table (what precedes the tensor data)."""
    w = GGUFWriter(path=None, arch=cfg.arch.gguf_arch)
    w.add_type("model")
    w.add_name(name)
    w.add_basename(name)
    if size_label:
        w.add_size_label(size_label)
    w.add_quantized_by("qcompile")
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    _add_hparams(w, cfg)
    w.add_file_type(int(file_type))
    if any(p.type not in (T.F32, T.F16, T.BF16) for p in plan):
        w.add_quantization_version(GGML_QUANT_VERSION)
    _add_vocab(w, vocab)
    for p in plan:
        rows = int(np.prod(p.shape[:-1], dtype=np.int64)) if len(p.shape) > 1 else 1
        w.add_tensor_info(p.name, (rows, row_bytes(p.type, p.shape[-1])) if len(p.shape) > 1
                          else (row_bytes(p.type, p.shape[-1]),), np.dtype(np.uint8), p.nbytes, raw_dtype=p.type)
    return w


def padded(nbytes: int) -> int:
    """Bytes a tensor of ``nbytes`` takes in the file: each tensor's data starts on a 32-byte boundary."""
    return GGUFWriter.ggml_pad(nbytes, GGUF_DEFAULT_ALIGNMENT)


def header_bytes(cfg: ModelConfig, vocab: Vocab, plan: list[PlannedTensor], **meta) -> int:
    """Bytes before the first tensor's data (header, metadata, vocabulary, tensor table, padding) of the
    file :func:`write_gguf` writes with the same arguments. They do not depend on the tensor types, except
    whether any is quantized (the quantization version key)."""
    w = _writer(cfg, vocab, plan, **meta)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "header.gguf"
        try:
            w.write_header_to_file(path=path)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
        finally:
            w.close()
        return padded(path.stat().st_size)


def file_size(cfg: ModelConfig, vocab: Vocab, plan: list[PlannedTensor], **meta) -> int:
    """The exact size of the file :func:`write_gguf` writes for ``plan`` (same ``meta`` arguments)."""
    return header_bytes(cfg, vocab, plan, **meta) + sum(padded(p.nbytes) for p in plan)


def write_gguf(path: Path, cfg: ModelConfig, vocab: Vocab, plan: list[PlannedTensor],
               chunks_for: Callable[[PlannedTensor], Iterator[QuantizedTensor]], *, name: str, size_label: str,
               file_type: LlamaFileType, extra: dict[str, str] | None = None,
               on_tensor: Callable[[PlannedTensor], None] = lambda p: None,
               on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Write a complete GGUF to ``path`` (the caller renames it into place once verified)."""
    w = _writer(cfg, vocab, plan, name=name, size_label=size_label, file_type=file_type, extra=extra)
    try:
        w.write_header_to_file(path=path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p in plan:
            on_tensor(p)
            w.write_tensor_data(_ChunkedTensor(p, chunks_for(p), on_bytes))  # type: ignore[arg-type]
    finally:
        w.close()
