"""GGUF exporter (llama.cpp, Ollama, LM Studio) on gguf-py's ``GGUFWriter``.

It lays out tensors it is given; it never quantizes. Tensor data is streamed: the header and tensor
table are written from the plan, then each tensor's row-chunks are appended as they arrive, so the
writer holds one chunk at a time, not the model.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUF_DEFAULT_ALIGNMENT, GGUFWriter, LlamaFileType
from gguf import GGMLQuantizationType as T
from gguf.utility import size_label

from exporters.target import Output, Target, register, sha256_file
from qcompile.errors import QCompileError, UsageError, is_write_error, write_failed
from qcompile.model import Checkpoint, ModelConfig, Vocab, load_vocab
from qcompile.report_types import Artifact, TargetInfo, TensorRecord
from quantizers import rtn
from quantizers.error import ErrorTally
from quantizers.grids import GRIDS
from quantizers.schemes import BITS_PRESET, Scheme, scheme
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


def _add_vocab(w: GGUFWriter, vocab: Vocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
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
    cfg.arch.add_gguf_hparams(w, cfg)
    w.add_file_type(int(file_type))
    if any(p.type not in (T.F32, T.F16, T.BF16) for p in plan):
        w.add_quantization_version(GGML_QUANT_VERSION)
    _add_vocab(w, vocab)
    for p in plan:
        # the byte shape (gguf-py turns the last dimension back into values): [experts, rows, bytes] for a
        # stacked expert tensor, which llama.cpp reads as ne = {cols, rows, experts}
        w.add_tensor_info(p.name, (*p.shape[:-1], row_bytes(p.type, p.shape[-1])), np.dtype(np.uint8), p.nbytes,
                          raw_dtype=p.type)
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


class GGUFSource:
    """Weights read back from a written GGUF and dequantized: exactly what the runtime computes with."""

    def __init__(self, path: Path, cfg: ModelConfig):
        from gguf import GGUFReader
        self.cfg = cfg
        self.tensors = {t.name: t for t in GGUFReader(path).tensors}
        self.names = dict(cfg.name_map)
        if self.names[cfg.head_name] not in self.tensors:   # tied: the embeddings are the output matrix
            self.names[cfg.head_name] = self.names[cfg.embed_name]

    def _t(self, name: str):
        return self.tensors[self.names[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in reversed(self._t(name).shape.tolist()))

    def _decode(self, name: str, raw: np.ndarray) -> np.ndarray:
        t = self._t(name)
        cols = self.shape(name)[-1]
        raw = raw.reshape(raw.shape[0] if raw.ndim > 1 else 1, -1)
        return QuantizedTensor(t.name, T(t.tensor_type), (raw.shape[0], cols), raw).dequantize()

    def _raw(self, name: str) -> np.ndarray:
        t = self._t(name)
        rows = int(np.prod(self.shape(name)[:-1], dtype=np.int64)) if len(self.shape(name)) > 1 else 1
        return np.asarray(t.data).reshape(rows, -1)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._decode(name, self._raw(name)[start:stop])

    def take(self, name: str, ids: np.ndarray) -> np.ndarray:
        return self._decode(name, self._raw(name)[ids])

    def full(self, name: str) -> np.ndarray:
        a = self._decode(name, self._raw(name)).reshape(self.shape(name))
        layout = self.cfg.arch.gguf_layout(name, self.cfg)
        # the checkpoint's layout, which transformers' modules compute with (a squeezed conv1d regains its axis)
        return a if layout is None else layout.from_gguf(a)


# ---- the GGUF target -----------------------------------------------------------------------------------------

def choose_scheme(quant: str | None, bits: int | None, pure: bool = False) -> Scheme:
    """``--quant`` by name, else the ``--bits`` preset (4: Q4_K_M, 8: Q8_0)."""
    return scheme(quant or BITS_PRESET[bits or 4], pure=pure)


def tensor_plan(cfg: ModelConfig, ckpt: Checkpoint, sch: Scheme) -> list[PlannedTensor]:
    """One entry per output tensor, in llama.cpp's order, with the type the scheme assigns it."""
    names = cfg.name_map
    plan = []
    n_gqa = cfg.num_heads // cfg.num_kv_heads
    # a family whose llama.cpp loader requires output.weight (qwen2moe) gets the tied embeddings written twice;
    # the file is then untied as far as llama.cpp's type rules go
    duplicate_head = cfg.tie_word_embeddings and cfg.arch.REQUIRES_OUTPUT
    tied = cfg.tie_word_embeddings and not duplicate_head
    wanted = [(hf, hf) for hf in cfg.expected_tensor_names()] + ([(cfg.embed_name, cfg.head_name)] if duplicate_head
                                                                 else [])
    for source, hf in wanted:
        gname = names[hf]
        layout = cfg.arch.gguf_layout(hf, cfg)
        shape = layout.shape if layout is not None and layout.shape is not None else ckpt.entry(source).shape
        layer = int(gname.split(".")[1]) if gname.startswith("blk.") else None
        # llama-quantize counts the nextn (multi-token-prediction) layers among the layers of its schedules
        t = sch.tensor_type(gname, shape, layer=layer, n_layers=cfg.num_layers + cfg.mtp_layers, n_gqa=n_gqa, tied=tied,
                            n_expert=cfg.num_experts)
        plan.append(PlannedTensor(source, gname, shape, t))
    # llama.cpp expects token_embd, output_norm, output first, then the blocks
    top = {"token_embd.weight": 0, "output_norm.weight": 1, "output.weight": 2}
    return sorted(plan, key=lambda p: (top.get(p.name, 3), plan.index(p)))


def quantized_chunks(ckpt: Checkpoint, p: PlannedTensor, engine, threads: int | None,
                     errors: ErrorTally | None = None) -> Iterator[QuantizedTensor]:
    """One tensor's quantized rows: from the calibration engine for what it produced (decoder linears;
    norms and biases that AWQ folded scales into) when a calibrated method runs, else streamed from the
    checkpoint through RTN, row-chunk by row-chunk. ``errors`` gets the tensor's reconstruction error
    (measured on each chunk while its float rows are in memory, or taken from the engine)."""
    index = int(p.name.split(".")[1]) if p.name.startswith("blk.") else None
    # the engine makes the decoder's layers; a nextn layer after them is RTN
    layer = engine.layer(index) if engine is not None and index is not None and index < ckpt.config.num_layers else {}
    layout = ckpt.config.arch.gguf_layout(p.source, ckpt.config)
    if p.source in layer:
        qt = layer[p.source]
        if qt.type != p.type:
            raise RuntimeError(f"{p.name}: engine produced {qt.type.name}, planned {p.type.name}")
        if errors is not None:
            errors.take(engine.errors, p.source, as_name=p.name)
        data = qt.data
        if layout is not None:
            # whole rows move (row-wise quantization commutes with that); columns the engine already quantized
            # in the file's order (LayerwiseEngine._quantize_group); values are never transformed for a linear
            if layout.offset or layout.neg_exp or qt.type == T.F32:
                raise RuntimeError(f"{p.name}: the engine's tensor needs llama.cpp's layout {layout}")
            data = data.reshape(qt.shape[0], -1)[layout.rows] if layout.rows is not None else data
        yield QuantizedTensor(p.name, qt.type, qt.shape, data)
        return
    if layout is not None:   # laid out as llama.cpp's converter writes it: read whole (a layer's tensor at most)
        whole = layout.to_gguf(ckpt.read(p.source))
        chunks = [(0, whole[None, :] if whole.ndim == 1 else whole.reshape(-1, whole.shape[-1]))]
    else:
        chunks = [(0, ckpt.read(p.source)[None, :])] if len(p.shape) == 1 else ckpt.iter_rows(p.source)
    head = engine is not None and p.name == "output.weight" and p.type in GRIDS
    stats = engine.head_stats() if head else None
    for r0, rows in chunks:
        # the output matrix by the method itself (GPTQ, imatrix: rows are independent given the statistics,
        # so chunks of rows give the same result as the whole matrix); what else the engine did not make, RTN
        q = replace(engine.method.quantize(p.name, rows, p.type, stats), row0=r0) if head else \
            rtn.quantize(p.name, rows, p.type, row0=r0, threads=threads)
        if errors is not None:
            errors.add(p.name, rows, q)
        yield q


@dataclass
class GGUFTypes:
    """The types of a GGUF run: the scheme and one planned type per output tensor (a size budget's allocation
    replaces ``plan``), the vocabulary and the metadata the writer's header holds."""
    scheme: Scheme
    plan: list[PlannedTensor]
    vocab: Vocab
    meta: dict


@register
class GGUFTarget(Target):
    """One .gguf file for llama.cpp (Ollama, LM Studio): llama.cpp's mixes or per-tensor types within a budget,
    written as it is quantized, verified on the bytes written and renamed into place."""
    name = "gguf"
    runtime = "llama.cpp"
    looks_like = "a .gguf file"
    sized = True
    packaged = True
    has_weights = True
    experts = True
    hybrid = True

    def __init__(self):
        self.scheme: Scheme | None = None
        self.types: GGUFTypes | None = None
        self.tower = None   # qcompile.model.vision.VisionTower of a multimodal checkpoint (the mmproj file)

    def check(self, opts) -> None:
        super().check(opts)
        if (opts.max_size is not None or opts.target_bpw is not None) and opts.pure:
            budget = "--max-size" if opts.max_size is not None else "--target-bpw"
            raise UsageError(f"{budget} chooses a type per tensor; --pure asks for one type everywhere")

    def prepare(self, job) -> None:
        job.vocab = load_vocab(job.res.path, job.cfg.vocab_size)
        self.scheme = choose_scheme(job.opts.quant, job.opts.bits, job.opts.pure)
        self.tower = None
        if job.opts.mmproj != "none":
            import json

            from qcompile.model.vision import vision_tower
            self.tower = vision_tower(job.res.path, json.loads((job.res.path / "config.json").read_text()))
            if self.tower is None and job.opts.mmproj != "auto":
                raise UsageError(f"--mmproj {job.opts.mmproj}: {job.res.name} has no vision tower (vision_config)")

    def low_bit(self, job) -> bool:
        return self.scheme.quantized and self.scheme.base not in (T.Q8_0, T.Q6_K)

    def needs_statistics(self, job) -> bool:
        """Mixes with tensors llama.cpp will not round without an importance matrix (IQ3_XXS: llama-quantize
        refuses it without ``--imatrix``)."""
        return self.scheme.base in (T.IQ3_XXS,)

    def assign(self, job) -> None:
        # calibrated methods are llama-quantize --imatrix's counterpart: the mix rules that depend on an imatrix
        # (Q4_0/Q5_0's first ffn_down, IQ4's, IQ3_XXS's attn_v and ffn_down) follow that
        sch = replace(self.scheme, has_imatrix=job.method.needs_calibration)
        self.scheme = sch
        plan = tensor_plan(job.cfg, job.ckpt, sch)
        meta = dict(name=job.res.name, size_label=size_label(job.n_params, 0, 0, 0), file_type=sch.file_type)
        self.types = GGUFTypes(sch, plan, job.vocab, meta)

    def scheme_name(self, job) -> str:
        return self.scheme.name

    def artifact_path(self, job) -> Path:
        return job.opts.out / f"{job.res.name}-{job.scheme_name}.gguf"

    def cost_inputs(self, job) -> tuple[int, dict[tuple, int], str | None]:
        plan = self.types.plan
        rtn_work: dict[tuple, int] = {}
        for p in plan:
            if len(p.shape) == 2:
                rtn_work[(p.type, p.shape[-1])] = rtn_work.get((p.type, p.shape[-1]), 0) + int(np.prod(p.shape))
        return (job.budget.bytes if job.budget else sum(p.nbytes for p in plan)), rtn_work, None

    def engine_types(self, job) -> dict[str, T]:
        return {p.source: p.type for p in self.types.plan}

    def fingerprint(self, job) -> tuple:
        return (job.scheme_name, sorted((p.source, p.type.name) for p in self.types.plan))

    def work_dir(self, job) -> Path:
        return job.opts.out / f".{job.artifact.stem}.resume"

    def produce(self, job) -> Output:
        opts, plan, out = job.opts, self.types.plan, Output(job.artifact, [job.artifact])
        out.pending = opts.out / f".{job.artifact.name}.{os.getpid()}.tmp"
        try:
            with job.stage("quantize_export"), job.progress(total=sum(p.nbytes for p in plan), unit="B",
                                                            unit_scale=True,
                                                            desc=f"{job.method.name} {job.scheme_name}") as bar:
                try:
                    write_gguf(out.pending, job.cfg, self.types.vocab, plan,
                               lambda p: quantized_chunks(job.ckpt, p, job.engine, opts.threads, job.errors),
                               **self.types.meta, on_tensor=lambda p: bar.set_postfix_str(p.name, refresh=False),
                               on_bytes=bar.update)
                except OSError as e:
                    if not is_write_error(e):
                        raise
                    raise write_failed(job.artifact, e, opts.out) from None
            if self.tower is not None:
                self._write_mmproj(job, out)
            planned = job.allocation["bytes"] if job.allocation is not None else None
            if planned is not None and not out.pending.stat().st_size == planned <= job.budget.bytes:
                raise RuntimeError(f"wrote {out.pending.stat().st_size} bytes; planned {planned} within the "
                                   f"budget of {job.budget.bytes}")  # the size model is exact: a bug if not
        except BaseException:
            self.discard(job, out)  # a half-written file never stays behind
            raise
        return out

    def companion_paths(self, job) -> list[Path]:
        """A multimodal checkpoint's ``mmproj-{name}-{TYPE}.gguf`` (unless ``--mmproj none``)."""
        if self.tower is None:
            return []
        return [job.opts.out / f"mmproj-{job.res.name}-{self._mmproj_kind(job).upper()}.gguf"]

    @staticmethod
    def _mmproj_kind(job) -> str:
        return "f16" if job.opts.mmproj == "auto" else job.opts.mmproj

    def _write_mmproj(self, job, out: Output) -> None:
        """The vision tower as ``mmproj-{name}-{TYPE}.gguf`` beside the text GGUF, under a temporary name until
        the text file is published with it."""
        from exporters.mmproj import write_mmproj
        kind = self._mmproj_kind(job)
        final, = self.companion_paths(job)
        pending = job.opts.out / f".{final.name}.{os.getpid()}.tmp"
        out.companions.append((pending, final))
        out.files.append(final)
        with job.stage("mmproj"):
            try:
                write_mmproj(pending, job.ckpt, self.tower, kind, job.res.name)
            except OSError as e:
                if not is_write_error(e):
                    raise
                raise write_failed(final, e, job.opts.out) from None

    def size(self, job) -> int:
        """The exact bytes of the file for the current plan (the size model checks itself against this)."""
        return file_size(job.cfg, self.types.vocab, self.types.plan, **self.types.meta)

    def reference(self, job, out: Output) -> GGUFSource:
        return GGUFSource(out.pending or out.main, job.cfg)

    def runtime_logits(self, job, out: Output, tokens):
        from qcompile import llama_worker
        if not llama_worker.available():
            return None
        try:
            return llama_worker.logits(out.pending or out.main, tokens.tolist(), job.opts.threads)
        except RuntimeError as e:
            raise QCompileError(f"verification failed: llama.cpp could not run the GGUF ({e})") from None

    def publish(self, job, out: Output) -> None:
        for pending, final in out.companions:
            os.replace(pending, final)
        out.companions = []
        os.replace(out.pending, out.main)
        out.pending = None

    def discard(self, job, out: Output | None) -> None:
        if out is not None and out.pending is not None:
            out.pending.unlink(missing_ok=True)
        for pending, _final in (out.companions if out is not None else []):
            pending.unlink(missing_ok=True)

    def report(self, job, out: Output) -> dict:
        sch, plan, size = self.scheme, self.types.plan, out.main.stat().st_size
        types: dict[str, int] = {}
        for p in plan:
            types[p.type.name] = types.get(p.type.name, 0) + 1
        return {
            "target": TargetInfo(format=self.name, scheme=job.scheme_name, pure=sch.pure, method=job.method.name,
                                 file_type=int(sch.file_type), base_scheme=sch.name if job.budget else None),
            "calibration": job.calib_info,
            "artifact": Artifact(path=out.main.name, bytes=size, sha256=sha256_file(out.main),
                                 bits_per_weight=8.0 * size / job.n_params),
            "tensor_types": types,
            "tensors": [TensorRecord(p.name, p.type.name, list(p.shape), p.nbytes, job.errors.rel_error(p.name))
                        for p in plan],
            "allocation": job.allocation,
        }

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".gguf"

    @classmethod
    def runtime_available(cls) -> bool:
        from qcompile import llama_worker
        return llama_worker.available()

    @classmethod
    def runner(cls, path: Path, threads: int | None = None) -> LlamaRunner:
        return LlamaRunner(path, threads)

    @classmethod
    def generate(cls, path: Path, prompt: str, max_tokens: int, raw: bool, threads: int | None = None) -> str:
        try:
            return LlamaRunner(path, threads).generate(prompt, max_tokens, chat=not raw)
        except RuntimeError as e:
            raise QCompileError(f"llama.cpp could not run {path} ({e})") from None

    @classmethod
    def weights(cls, path: Path, cfg) -> GGUFSource:
        return GGUFSource(path, cfg)


class LlamaRunner:
    """A GGUF in llama.cpp (llama-cpp-python in a child process): the runner interface of the folder targets."""

    def __init__(self, path: Path, threads: int | None = None):
        from qcompile import llama_worker
        if not llama_worker.available():
            raise QCompileError("running a GGUF needs llama-cpp-python (pip install 'qcompile[llama]')")
        self.path, self.threads, self._worker = path, threads, llama_worker

    def logits(self, tokens) -> np.ndarray:
        try:
            return self._worker.logits(self.path, np.asarray(tokens).tolist(), self.threads)
        except RuntimeError as e:
            raise QCompileError(f"llama.cpp could not run {self.path} ({e})") from None

    def generate(self, prompt: str, max_tokens: int, chat: bool = True) -> str:
        return self._worker.generate(self.path, prompt, max_tokens, chat=chat, threads=self.threads)
