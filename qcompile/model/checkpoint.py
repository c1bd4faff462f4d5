"""Streaming access to a Hugging Face checkpoint's weights: safetensors (single or sharded), lazily.

Why not ``safetensors.safe_open``: its NumPy backend cannot return bfloat16 (the dtype most Qwen
checkpoints ship in), and its PyTorch backend would pull torch (~250 MB RSS) into a conversion that
needs none, and maps whole shards into the address space. The format is a JSON header plus raw
little-endian arrays, so we read exactly the rows we need with positioned reads into small buffers:
peak RSS is one row-chunk, not one model, and a truncated or corrupt shard is caught before any
output is written.
"""
from __future__ import annotations

import json
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from qcompile.errors import QCompileError
from qcompile.model.config import ModelConfig

_DTYPES = {"BF16": (np.dtype("<u2"), 2), "F16": (np.dtype("<f2"), 2), "F32": (np.dtype("<f4"), 4)}
# float32 bytes per streamed row-chunk (QCOMPILE_CHUNK_BYTES tunes it: smaller = less RSS, more calls)
CHUNK_BYTES = int(os.environ.get("QCOMPILE_CHUNK_BYTES", 16 << 20))


@dataclass(frozen=True)
class TensorEntry:
    name: str
    path: Path
    dtype: str               # safetensors dtype string: BF16 | F16 | F32
    shape: tuple[int, ...]
    offset: int              # absolute byte offset of the data in the file
    nbytes: int
    # a stacked tensor assembled from stored rows (MoE experts): (stored name, first row, end row) in order
    pieces: tuple[tuple[str, int, int], ...] = ()

    @property
    def rows(self) -> int:
        """Rows over all but the last dimension (an expert tensor [E, I, H] has E * I)."""
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]


def _read_header(path: Path) -> dict[str, TensorEntry]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QCompileError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise QCompileError(f"{path}: corrupt safetensors file (header length {n} exceeds file size {size})")
            header = json.loads(f.read(n))
    except QCompileError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise QCompileError(f"{path}: corrupt safetensors header ({e.__class__.__name__}: {e})") from None
    base = 8 + n
    out: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise QCompileError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if dtype not in _DTYPES:
            raise QCompileError(f"{path}: tensor {name!r} has dtype {dtype}; supported: BF16, F16, F32")
        if end - start != int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1]:
            raise QCompileError(f"{path}: corrupt safetensors header ({name!r} size does not match its shape)")
        if base + end > size:
            raise QCompileError(f"{path}: truncated safetensors file ({name!r} ends at byte {base + end}, "
                                f"file has {size})")
        out[name] = TensorEntry(name, path, dtype, shape, base + start, end - start)
    return out


_END = object()


def _to_f32(buf: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Raw checkpoint values as float32 (bf16: the 16 bits are a float32's upper half); into ``out`` (a
    float32 array of ``buf``'s size) in place when given, with no temporary."""
    if out is None:
        out = np.empty(buf.shape, np.float32)
    if dtype == "BF16":
        u = out.view(np.uint32)
        u[...] = buf
        u <<= 16
    else:
        out[...] = buf
    return out


def _prefetched(items: Iterator, depth: int = 1) -> Iterator:
    """Run a generator one item ahead on a daemon thread; its exceptions re-raise in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)

    def produce() -> None:
        try:
            for item in items:
                q.put((item, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((None, e))
            return
        q.put((_END, None))

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item, err = q.get()
        if err is not None:
            raise err
        if item is _END:
            return
        yield item


def torch_int_view(t):
    """The same-width integer dtype, to hand torch storage to NumPy bit for bit (NumPy has no bf16)."""
    import torch
    return {2: torch.int16, 4: torch.int32}[t.element_size()]


def _weight_map(index: Path) -> dict[str, str]:
    """A sharded checkpoint's ``model.safetensors.index.json``: tensor name -> shard file."""
    try:
        return dict(json.loads(index.read_text())["weight_map"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QCompileError(f"{index}: unreadable shard index ({e})") from None


def unprefixed_mtp(name: str) -> str | None:
    """A multimodal release stores its multi-token-prediction layers under ``model.mtp.``; the text-only one
    (and every description here) under ``mtp.``: the latter name for the former, else None."""
    return name.removeprefix("model.") if name.startswith("model.mtp.") else None


def stored_names(model_dir: Path) -> list[str]:
    """The tensor names a safetensors checkpoint stores (its index, else its shards' headers; no tensor read),
    for what config.json does not say (how many MTP layers there are) before :class:`Checkpoint` opens it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return list(_weight_map(index))
    return [n for s in sorted(model_dir.glob("*.safetensors")) for n in _read_header(s)]


class Checkpoint:
    """The weights of one checkpoint directory, opened lazily and read row-chunk by row-chunk."""

    def __init__(self, model_dir: Path, config: ModelConfig, allow_pickle: bool = False):
        self.dir = model_dir
        self.config = config
        self.allow_pickle = allow_pickle
        self._pickled: dict = {}  # name -> torch tensor (memory-mapped), only for --allow-pickle
        self.entries = self._index()
        for name in list(self.entries):
            if (alias := unprefixed_mtp(name)) is not None:
                self.entries.setdefault(alias, self.entries[name])
        self._stack_experts()
        self._row_views()
        self._check_complete()

    def _index(self) -> dict[str, TensorEntry]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _weight_map(index)
            shards = sorted(set(weight_map.values()))
            for s in shards:
                if not (self.dir / s).is_file():
                    raise QCompileError(f"{index}: names shard {s!r}, which is missing from {self.dir}")
        else:
            shards = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not shards:
            bins = sorted(self.dir.glob("*.bin"))
            if bins and self.allow_pickle:
                return self._index_pickle(bins)
            if bins:
                raise QCompileError(f"{self.dir}: only pickle .bin weights found; pickle files can run code when "
                                    f"loaded: convert them to safetensors, or pass --allow-pickle if you trust them")
            raise QCompileError(f"{self.dir}: no *.safetensors weights found")
        entries: dict[str, TensorEntry] = {}
        for s in shards:
            entries.update(_read_header(self.dir / s))
        return entries

    def _index_pickle(self, bins: list[Path]) -> dict[str, TensorEntry]:
        """--allow-pickle: PyTorch .bin shards via ``torch.load(weights_only=True, mmap=True)``."""
        import torch
        names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
        entries: dict[str, TensorEntry] = {}
        for b in bins:
            try:
                state = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise QCompileError(f"{b}: cannot load pickle weights ({e.__class__.__name__})") from None
            for name, t in state.items():
                if t.dtype not in names:
                    raise QCompileError(f"{b}: tensor {name!r} has dtype {t.dtype}; supported: bf16, f16, f32")
                self._pickled[name] = t
                entries[name] = TensorEntry(name, b, names[t.dtype], tuple(t.shape), 0, t.numel() * t.element_size())
        return entries

    def _stack_experts(self) -> None:
        """Add the stacked expert tensors of an MoE checkpoint as entries made of stored rows (per-expert or
        fused layout, :meth:`~qcompile.model.architectures.MoeArchitecture.stacked_sources`)."""
        cfg = self.config
        if not cfg.arch.moe:
            return
        shapes = {n: e.shape for n, e in self.entries.items()}
        for i in range(cfg.num_layers + cfg.mtp_layers):   # the multi-token-prediction layers have experts too
            for rel in cfg.arch.EXPERTS:
                name = cfg.arch.layer_prefix(i) + rel
                try:
                    pieces = cfg.arch.stacked_sources(i, rel, cfg.num_experts, shapes)
                except KeyError as e:
                    raise QCompileError(f"{self.dir}: tensor {e.args[0]!r} is missing from the checkpoint") from None
                first = self.entries[pieces[0][0]]
                rows = sum(b - a for _, a, b in pieces)
                if rows % cfg.num_experts or any(self.entries[n].dtype != first.dtype or
                                                 self.entries[n].cols != first.cols for n, _, _ in pieces):
                    raise QCompileError(f"{self.dir}: the experts of {name} do not stack "
                                        f"({len(pieces)} pieces, {rows} rows for {cfg.num_experts} experts)")
                shape = (cfg.num_experts, rows // cfg.num_experts, first.cols)
                self.entries[name] = TensorEntry(name, first.path, first.dtype, shape, -1,
                                                 rows * first.cols * _DTYPES[first.dtype][1], tuple(pieces))

    def _row_views(self) -> None:
        """Add the tensors the description reads as rows of a stored one (Qwen3-Next's ``in_proj_qkvz`` as its
        qkv and z parts, :meth:`~qcompile.model.architectures.Architecture.row_views`)."""
        cfg = self.config
        for i in range(cfg.num_layers):
            covered: dict[str, int] = {}
            for rel, pieces in cfg.arch.row_views(i, cfg.raw).items():
                name, (src, *_), rows = cfg.arch.layer_prefix(i) + rel, pieces[0], sum(b - a for _, a, b in pieces)
                if src not in self.entries:
                    raise QCompileError(f"{self.dir}: tensor {src!r} is missing from the checkpoint")
                e = self.entries[src]
                covered[src] = covered.get(src, 0) + rows
                self.entries[name] = TensorEntry(name, e.path, e.dtype, (rows, e.cols), -1,
                                                 rows * e.cols * _DTYPES[e.dtype][1], tuple(pieces))
            for src, rows in covered.items():   # the views must tile the stored tensor exactly
                if len(self.entries[src].shape) != 2 or rows != self.entries[src].rows:
                    raise QCompileError(f"{self.dir}: {src} has shape {list(self.entries[src].shape)}; the config's "
                                        f"linear-attention heads make {rows} rows")

    def _check_complete(self) -> None:
        cfg = self.config
        for name in cfg.expected_tensor_names():
            if name not in self.entries:
                raise QCompileError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        emb = self.entries[cfg.embed_name].shape
        if emb != (cfg.vocab_size, cfg.hidden_size):
            raise QCompileError(f"{self.dir}: {cfg.embed_name} has shape {list(emb)}, config says "
                                f"[{cfg.vocab_size}, {cfg.hidden_size}]")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> TensorEntry:
        return self.entries[name]

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a tensor as float32 (1-D tensors: the whole vector). Rejects NaN/Inf."""
        e = self.entries[name]
        dt, width = _DTYPES[e.dtype]
        row_bytes = e.cols * width
        stop = e.rows if stop is None else min(stop, e.rows)
        if e.pieces:
            return self._read_stacked(e, start, stop)
        if name in self._pickled:
            t = self._pickled[name].reshape(e.rows, e.cols)[start:stop]
            buf = t.contiguous().view(-1).view(torch_int_view(t)).numpy().view(dt)
            out = _to_f32(buf, e.dtype)
        else:
            # read and convert a slice at a time into the float32 result: a whole 7B embedding table costs
            # its float32 size (2.2 GB), not that plus its raw bytes plus a conversion temporary (5.4 GB)
            out = np.empty((stop - start) * e.cols, dtype=np.float32)
            step = max(1, CHUNK_BYTES // 4 // max(1, e.cols)) * e.cols   # whole rows per slice
            buf = np.empty(min(step, out.size), dtype=dt)
            with open(e.path, "rb", buffering=0) as f:
                f.seek(e.offset + start * row_bytes)
                for i in range(0, out.size, step):
                    part = buf[:min(step, out.size - i)]
                    if f.readinto(memoryview(part).cast("B")) != part.nbytes:
                        raise QCompileError(f"{e.path}: truncated while reading {name!r}")
                    _to_f32(part, e.dtype, out[i:i + part.size])
        # one cheap reduction (NaN/Inf propagate through a sum); the exact scan only runs when it trips
        if not np.isfinite(out.sum()) and not np.isfinite(out).all():
            bad = int(np.flatnonzero(~np.isfinite(out))[0]) + start * e.cols
            raise QCompileError(f"{e.path}: tensor {name!r} contains NaN/Inf (first at flat index {bad})")
        return out.reshape(stop - start, e.cols) if len(e.shape) > 1 else out

    def _read_stacked(self, e: TensorEntry, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a stacked tensor, gathered from the stored rows that make it up."""
        out, at = [], 0
        for src, a, b in e.pieces:
            lo, hi = max(start, at), min(stop, at + b - a)
            if lo < hi:
                out.append(self.read_rows(src, a + lo - at, a + hi - at).reshape(hi - lo, e.cols))
            at += b - a
        return np.concatenate(out) if len(out) != 1 else out[0]

    def read(self, name: str) -> np.ndarray:
        """A whole tensor as float32 in its own shape."""
        return self.read_rows(name).reshape(self.entries[name].shape)

    def iter_rows(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_row, float32 rows) chunks of a 2-D tensor, each about ``chunk_bytes`` of float32.

        The next chunk is read and converted on a background thread while the caller works on this one
        (file reads and NumPy conversions release the GIL), so I/O overlaps quantization.
        """
        e = self.entries[name]
        step = max(1, chunk_bytes // (4 * e.cols))
        return _prefetched((r, self.read_rows(name, r, r + step)) for r in range(0, e.rows, step))

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values() if not e.pieces)
