"""What the folder targets (ONNX, OpenVINO) share: one integer grid for every decoder linear, the head and
embedding policy, quantization of every linear before the graph is built, and verification of the folder's
runtime against the dequantized model.

The graph is built only once every linear is quantized (the exporters bind constants into a traced graph);
until then the quantized tensors wait on disk, memory-mapped (:class:`qcompile.spill.Spill`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from exporters.target import Output, Target, sha256_file
from qcompile.errors import QCompileError, UsageError
from qcompile.model import (
    Checkpoint,
    CheckpointSource,
    ModelConfig,
    QuantizedSource,
    WeightSource,
)
from qcompile.model.experts import per_expert_name
from qcompile.report_types import Artifact, ArtifactFile, TargetInfo, TensorRecord
from qcompile.spill import Spill, release
from quantizers import rtn
from quantizers.error import ErrorTally
from quantizers.grids import IntType, parse_type
from quantizers.tensor import QuantizedTensor

PRESET = {4: "INT4_G128", 8: "INT8_G128"}   # --bits -> integer grid


def choose_int_type(quant: str | None, bits: int | None) -> IntType:
    """The integer grid of a folder run: ``--quant`` by name, else the ``--bits`` preset."""
    name = quant or PRESET[bits or 4]
    try:
        t = parse_type(name)
    except (UsageError, ValueError) as e:
        raise QCompileError(f"--quant {name}: {e.args[0] if isinstance(e, ValueError) else 'not an integer grid'}"
                            " (ONNX takes INT4_G128, INT8_G32_SYM, ...: bits 4|8, group 16..256)") from None
    if not isinstance(t, IntType):
        raise QCompileError(f"--quant {name}: ONNX weights use integer grids (INT4_G128, INT8_G32_SYM, ...), "
                            "not GGUF types")
    return t


def head_type(target: IntType) -> IntType:
    """The output matrix's grid: 8-bit (llama.cpp keeps it at Q6_K/Q8_0 too: it is the most sensitive
    matrix), same group size; per-channel asymmetric (``INT8_PC``) for a per-channel target, which is how
    NNCF stores lm_head and the embeddings."""
    return IntType(8, target.group)


@dataclass
class FolderTypes:
    """The types of a folder run: the decoder linears' grid and the head's."""
    linear: IntType
    head: IntType


class FolderTarget(Target):
    """A model folder built from a traced graph (subclasses: ONNX, OpenVINO)."""
    main_file: ClassVar[str]
    module: ClassVar[str]              # the runtime's Python module (a missing one is a one-line error)
    float_embeddings: ClassVar[str]    # the float type a kept embedding table is stored in
    quantized_embeddings: ClassVar[bool] = False  # the input embeddings on the head's grid too
    experts: ClassVar[bool] = True    # routed experts: one traced MatMul per expert (qcompile.model.experts)

    def __init__(self):
        self.types: FolderTypes | None = None

    def check(self, opts) -> None:
        super().check(opts)
        try:
            __import__(self.module)
        except ImportError as e:
            raise QCompileError(f"--to {self.name} needs {e.name} (pip install {e.name})") from None
        # before resolving: a grid the target cannot hold fails without a download
        t = choose_int_type(opts.quant, opts.bits)
        self.check_grid(t)
        self.types = FolderTypes(t, head_type(t))

    def check_grid(self, t: IntType) -> None:
        """Refuse a grid this runtime cannot load."""

    # ---- types ------------------------------------------------------------------------------------------
    def low_bit(self, job) -> bool:
        return self.types.linear.bits < 8

    def assign(self, job) -> None:
        cfg, ckpt, t = job.cfg, job.ckpt, self.types.linear
        for i in range(cfg.num_layers):
            experts = cfg.arch.expert_names(i) if cfg.arch.moe else ()
            for lin, name in [*zip(cfg.arch.linears(i), cfg.linear_names(i)), *((n.split(".", 3)[3], n) for n in experts)]:
                try:
                    t.group_for(ckpt.entry(name).shape[-1])
                except ValueError as e:
                    raise QCompileError(f"layer {i} {lin}: {e}") from None

    def scheme_name(self, job) -> str:
        return self.types.linear.name

    def artifact_path(self, job) -> Path:
        return job.opts.out / self.main_file

    def cost_inputs(self, job) -> tuple[int, dict[tuple, int], str | None]:
        shapes, t = job.shapes, self.types.linear
        emb = 2 if self.quantized_embeddings else 5  # 8-bit (OpenVINO) or float32 (ONNX) input embeddings
        # codes + f16 scales + zero points per group; 8-bit lm_head, plus the embeddings
        group = t.group or shapes.hidden  # a per-channel grid (group 0) has one scale per row
        est_bytes = int(shapes.layers * shapes.layer_linear * (t.bits / 8 + 2.5 / group)
                        + shapes.vocab * shapes.hidden * emb)
        rtn_work = {(t, shapes.hidden): shapes.layers * shapes.layer_linear,
                    (self.types.head, shapes.hidden): shapes.vocab * shapes.hidden * (2 if self.quantized_embeddings
                                                                                     else 1)}
        return est_bytes, rtn_work, self.name

    def engine_types(self, job) -> dict[str, IntType]:
        return {n: self.types.linear for n in job.cfg.decoder_linears() + job.cfg.expert_tensors()}

    def fingerprint(self, job) -> tuple:
        # the grid alone: ONNX and OpenVINO quantize the same linears onto the same grid through the same engine,
        # so a calibrated run of one serves the other (--calib-cache); their resume folders are apart by name
        return (self.types.linear.name,)

    def work_dir(self, job) -> Path:
        return job.opts.out / f".{self.name}.resume"

    # ---- writing ----------------------------------------------------------------------------------------
    def produce(self, job) -> Output:
        opts, cfg, ckpt = job.opts, job.cfg, job.ckpt
        names = set(cfg.decoder_linears() + cfg.expert_tensors())
        # the quantized tensors wait on disk until the graph is built and verified (the run closes the spill)
        spill = job.hold(Spill(opts.out / f".{self.name}.spill"))
        with job.stage("quantize"):
            with job.progress(total=cfg.num_layers, unit="layer", desc=f"{job.method.name} {self.types.linear.name}") \
                    as bar:
                tensors = quantize_decoder(cfg, CheckpointSource(ckpt), self.types.linear, job.engine, opts.threads,
                                           on_layer=lambda i: bar.update(1), errors=job.errors, keep=spill.put)
            if not opts.keep_embeddings_fp:
                tensors[cfg.head_name] = quantize_head(ckpt, cfg, self.types.head, opts.threads, job.errors, spill)
                if self.quantized_embeddings:
                    tensors[cfg.embed_name] = quantize_embeddings(ckpt, self.types.head, opts.threads, job.errors,
                                                                  spill)
        with job.stage("export"):
            # AWQ folds scales into norms/biases: those go into the float graph before the linears are swapped
            linears = {n: q for n, q in tensors.items() if n in names or n in (cfg.head_name, cfg.embed_name)}
            folded = {n: q.dequantize().reshape(-1) for n, q in tensors.items() if n not in linears}
            for n in cfg.expert_tensors():   # the graph reads one MatMul per expert: the stacked rows, cut
                linears |= split_experts(linears.pop(n), cfg.num_experts)
            files = self.write(job, linears, folded)
        return Output(opts.out / self.main_file, files, tensors=tensors)

    def write(self, job, linears: dict[str, QuantizedTensor], folded: dict[str, np.ndarray]) -> list[Path]:
        raise NotImplementedError

    def reference(self, job, out: Output) -> WeightSource:
        return QuantizedSource(CheckpointSource(job.ckpt), out.tensors, job.cfg.head_name)

    def runtime_logits(self, job, out: Output, tokens):
        try:
            return self.runner(job.opts.out, job.opts.threads).logits(tokens)
        except Exception as e:  # onnxruntime and openvino raise their own exception types
            raise QCompileError(f"verification failed: {self.runtime} could not run the model ({e})") from None

    def discard(self, job, out: Output | None) -> None:
        for f in (out.files if out is not None else []):
            f.unlink(missing_ok=True)

    def report(self, job, out: Output) -> dict:
        t, opts, cfg = self.types.linear, job.opts, job.cfg
        size = sum(f.stat().st_size for f in out.files)
        return {
            "target": TargetInfo(format=self.name, scheme=t.name, bits=t.bits, group_size=t.group, symmetric=t.sym,
                                 method=job.method.name,
                                 lm_head=self.float_head if opts.keep_embeddings_fp else self.types.head.name,
                                 embeddings=out.tensors[cfg.embed_name].type.name
                                 if cfg.embed_name in out.tensors else self.float_head,
                                 **self.report_extras(job)),
            "calibration": job.calib_info,
            "artifact": Artifact(path=self.main_file, bytes=size,
                                 files=[ArtifactFile(f.name, f.stat().st_size, sha256_file(f)) for f in out.files],
                                 bits_per_weight=8.0 * size / job.n_params),
            "tensors": [TensorRecord(n, q.type.name, list(q.shape), q.nbytes, job.errors.rel_error(n))
                        for n, q in out.tensors.items()],
        }

    float_head: ClassVar[str] = "float16"   # what a kept float head / embedding table is reported as

    def report_extras(self, job) -> dict:
        return {}

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_dir() and (path / cls.main_file).is_file()

    @classmethod
    def runtime_available(cls) -> bool:
        try:
            __import__(cls.runtime)
        except ImportError:
            return False
        return True

    @classmethod
    def generate(cls, path: Path, prompt: str, max_tokens: int, raw: bool, threads: int | None = None) -> str:
        """Greedy generation in the folder's runtime, with the KV cache the graph carries."""
        import json

        from tokenizers import Tokenizer
        text = prompt if raw else _chat_prompt(path, prompt)
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        ids = tok.encode(text, add_special_tokens=False).ids
        if not ids:
            raise QCompileError("the prompt is empty")
        stop = set()
        for name in ("generation_config.json", "config.json"):
            if (path / name).is_file():
                eos = json.loads((path / name).read_text()).get("eos_token_id")
                stop |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        try:
            runner = cls.runner(path, threads)
        except Exception as e:  # onnxruntime / openvino raise their own exception types
            raise QCompileError(f"could not load {path} ({e})") from None
        return tok.decode(runner.generate(ids, max_tokens, stop), skip_special_tokens=True)


def _chat_prompt(tokenizer_dir: Path, prompt: str) -> str:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not tok.chat_template:
        return prompt
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


# ---- quantizing every linear of a folder run ------------------------------------------------------------------

def quantize_decoder(cfg: ModelConfig, source: WeightSource, target: IntType, engine=None,
                     threads: int | None = None, on_layer=lambda i: None,
                     errors: ErrorTally | None = None,
                     keep: Callable[[QuantizedTensor], QuantizedTensor] = lambda q: q) -> dict[str, QuantizedTensor]:
    """Every decoder linear on ``target``: from the calibration engine (with any norms/biases it folded
    scales into) or, without one, by RTN straight from ``source``. ``errors`` gets each tensor's
    reconstruction error; ``keep`` decides where each finished tensor waits (default: in memory;
    :class:`qcompile.spill.Spill` ``.put``: on disk, memory-mapped)."""
    tensors: dict[str, QuantizedTensor] = {}
    for i in range(cfg.num_layers):
        if engine is not None:
            layer = engine.layer(i)
            for n, q in layer.items():
                tensors[n] = keep(q)
                if errors is not None:
                    errors.take(engine.errors, n)
            del layer
        else:
            for n in cfg.linear_names(i):
                w = source.full(n)
                q = rtn.quantize(n, w, target, threads=threads)
                if errors is not None:
                    errors.add(n, w, q)
                tensors[n] = keep(q)
            for n in (cfg.arch.expert_names(i) if cfg.arch.moe else ()):
                tensors[n] = keep(_rtn_experts(source, n, cfg.num_experts, target, threads, errors))
        on_layer(i)
    return tensors


def split_experts(qt: QuantizedTensor, n_experts: int) -> dict[str, QuantizedTensor]:
    """A stacked expert tensor [E * rows, cols] as one QuantizedTensor per expert (views of the same bytes:
    the blocks of a row never span two rows, so each expert's rows are its own)."""
    rows, cols = qt.shape[0] // n_experts, qt.shape[-1]
    data = qt.data.reshape(qt.shape[0], -1)
    return {per_expert_name(qt.name, e): QuantizedTensor(per_expert_name(qt.name, e), qt.type, (rows, cols),
                                                         data[e * rows:(e + 1) * rows])
            for e in range(n_experts)}



def _rtn_experts(source: WeightSource, name: str, n_experts: int, t: IntType, threads: int | None,
                 errors: ErrorTally | None) -> QuantizedTensor:
    """RTN of a stacked expert tensor [E, rows, cols] one expert at a time (a 30B-A3B layer's stacked gate is
    0.8 GB in float32; one expert's, 6 MB), as the rows [E * rows, cols] the exporters cut again."""
    shape = source.shape(name)
    rows, parts = int(np.prod(shape[:-1])) // n_experts, []
    for e in range(n_experts):
        w = source.rows(name, e * rows, (e + 1) * rows)
        parts.append(rtn.quantize(name, w, t, row0=e * rows, threads=threads))
        if errors is not None:
            errors.add(name, w, parts[-1])
    return QuantizedTensor(name, t, (rows * n_experts, shape[-1]), np.concatenate([q.data for q in parts]))


def quantize_head(ckpt: Checkpoint, cfg: ModelConfig, t: IntType, threads: int | None,
                  errors: ErrorTally | None = None, spill: Spill | None = None) -> QuantizedTensor:
    """RTN of lm_head (the embeddings when tied), row chunk by row chunk. The float embeddings stay for the
    input lookup (ONNX), so a tied matrix is stored once in float and once in 8 bits, never twice in float."""
    return _rtn_rows(ckpt, cfg.head_source, cfg.head_name, t, threads, errors, spill)


def quantize_embeddings(ckpt: Checkpoint, t: IntType, threads: int | None,
                        errors: ErrorTally | None = None, spill: Spill | None = None) -> QuantizedTensor:
    """RTN of the input embedding table (OpenVINO: 8-bit lookup, as NNCF stores it)."""
    name = ckpt.config.embed_name
    return _rtn_rows(ckpt, name, name, t, threads, errors, spill)


def _rtn_rows(ckpt: Checkpoint, source: str, name: str, t: IntType, threads: int | None,
              errors: ErrorTally | None = None, spill: Spill | None = None) -> QuantizedTensor:
    """RTN of a big matrix one row chunk at a time, the chunks' bytes gathered in memory, or with ``spill``
    straight into one memory-mapped array on disk (the 7B head: 0.6 GB at 8 bits, never held)."""
    rows, cols = ckpt.entry(source).shape
    data = None
    for r0, chunk in ckpt.iter_rows(source):
        q = rtn.quantize(name, chunk, t, threads=threads)
        if errors is not None:
            errors.add(name, chunk, q)
        if data is None:
            data = (spill.empty if spill else np.empty)((rows, q.data.shape[1]), q.data.dtype)
        data[r0:r0 + len(chunk)] = q.data
        release(data)   # written pages go to the page cache, not the resident set
    if spill is not None:
        data.flush()
    return QuantizedTensor(name, t, (rows, cols), data)
