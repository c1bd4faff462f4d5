"""The compile pipeline, top to bottom: resolve -> load (streaming) -> quantize -> export -> verify -> finalize.

(Calibration slots in between load and quantize when a calibrated method is chosen.)
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf.utility import size_label

import quantizers
from exporters.gguf import PlannedTensor, write_gguf
from qcompile import evaluate, llama_worker, report
from qcompile.arch import ModelConfig, read_config
from qcompile.checkpoint import Checkpoint
from qcompile.errors import QCompileError
from qcompile.resolve import resolve
from qcompile.tokenizer import load_vocab
from quantizers.schemes import BITS_PRESET, Scheme, scheme
from quantizers.tensor import QuantizedTensor


@dataclass
class Options:
    model: str
    out: Path
    to: str = "gguf"
    bits: int | None = None
    quant: str | None = None
    pure: bool = False
    method: str = "rtn"
    force: bool = False
    verify: bool = True
    eval_text: Path | None = None
    eval_ctx: int = 256
    eval_tokens: int = 1024
    family: str = "instruct"
    offline: bool = False
    allow_pickle: bool = False
    threads: int | None = None
    quiet: bool = False
    argv: list[str] = field(default_factory=list)


def choose_scheme(opts: Options) -> Scheme:
    if opts.quant:
        return scheme(opts.quant, pure=opts.pure)
    return scheme(BITS_PRESET[opts.bits or 4], pure=opts.pure)


def make_plan(cfg: ModelConfig, ckpt: Checkpoint, sch: Scheme) -> list[PlannedTensor]:
    """One entry per output tensor, in llama.cpp's order, with the type the scheme assigns it."""
    names = cfg.name_map
    plan = []
    n_gqa = cfg.num_heads // cfg.num_kv_heads
    for hf in cfg.expected_tensor_names():
        gname = names[hf]
        shape = ckpt.entry(hf).shape
        layer = int(gname.split(".")[1]) if gname.startswith("blk.") else None
        t = sch.tensor_type(gname, shape, layer=layer, n_layers=cfg.num_layers, n_gqa=n_gqa,
                            tied=cfg.tie_word_embeddings)
        plan.append(PlannedTensor(hf, gname, shape, t))
    # llama.cpp expects token_embd, output_norm, output first, then the blocks
    top = {"token_embd.weight": 0, "output_norm.weight": 1, "output.weight": 2}
    return sorted(plan, key=lambda p: (top.get(p.name, 3), plan.index(p)))


def quantized_chunks(ckpt: Checkpoint, p: PlannedTensor, method: str, threads: int | None
                     ) -> Iterator[QuantizedTensor]:
    """Stream one tensor from the checkpoint through the quantizer, row-chunk by row-chunk."""
    quantize = quantizers.get(method)
    if len(p.shape) == 1:
        yield quantize(p.name, ckpt.read(p.source)[None, :], p.type, threads=threads)
        return
    for r0, rows in ckpt.iter_rows(p.source):
        yield quantize(p.name, rows, p.type, row0=r0, threads=threads)


def _progress(opts: Options, **kw):
    from tqdm import tqdm
    return tqdm(disable=opts.quiet, file=sys.stderr, dynamic_ncols=True, **kw)


def _log(opts: Options, msg: str) -> None:
    if not opts.quiet:
        print(msg, file=sys.stderr)


def check_output(out: Path, artifact: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise QCompileError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QCompileError(f"--out {out}: cannot create directory ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise QCompileError(f"--out {out}: directory is not writable")
    if artifact.exists() and not force:
        raise QCompileError(f"{artifact} already exists (use --force to overwrite)")


def compile_model(opts: Options) -> dict:
    """Run the whole pipeline; return the report written beside the artifact."""
    if opts.to != "gguf":
        raise QCompileError(f"--to {opts.to}: not available yet; supported targets: gguf")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # resolve
    res = resolve(opts.model, family=opts.family, offline=opts.offline)
    cfg = read_config(res.path)
    vocab = load_vocab(res.path, cfg.vocab_size)
    sch = choose_scheme(opts)
    # load (lazily: headers only; tensors stream during quantization)
    ckpt = Checkpoint(res.path, cfg, allow_pickle=opts.allow_pickle)
    plan = make_plan(cfg, ckpt, sch)
    out = opts.out
    artifact = out / f"{res.name}-{sch.name}.gguf"
    check_output(out, artifact, opts.force)
    timings["resolve"] = time.perf_counter() - t0
    eval_text = None
    if opts.verify:
        from qcompile.tiny import builtin_text
        if opts.eval_text:
            try:
                eval_text = opts.eval_text.read_text(encoding="utf-8")
            except OSError as e:
                raise QCompileError(f"--eval-text {opts.eval_text}: {e.strerror}") from None
        else:
            eval_text = builtin_text()
    n_params = sum(int(np.prod(p.shape)) for p in plan)
    tmp = out / f".{artifact.name}.{os.getpid()}.tmp"
    try:
        # quantize -> export, streamed tensor by tensor
        t1 = time.perf_counter()
        total = sum(p.nbytes for p in plan)
        with _progress(opts, total=total, unit="B", unit_scale=True, desc=f"quantize {sch.name}") as bar:
            write_gguf(tmp, cfg, vocab, plan, lambda p: quantized_chunks(ckpt, p, opts.method, opts.threads),
                       name=res.name, size_label=size_label(n_params, 0, 0, 0), file_type=sch.file_type,
                       on_tensor=lambda p: bar.set_postfix_str(p.name, refresh=False), on_bytes=bar.update)
        timings["quantize_export"] = time.perf_counter() - t1
        # verify, on the bytes just written
        metrics: dict = {}
        if opts.verify:
            t2 = time.perf_counter()
            metrics = verify(opts, cfg, ckpt, res.path, tmp, eval_text or "")
            timings["verify"] = time.perf_counter() - t2
        os.replace(tmp, artifact)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    timings["total"] = time.perf_counter() - t0
    size = artifact.stat().st_size
    types: dict[str, int] = {}
    for p in plan:
        types[p.type.name] = types.get(p.type.name, 0) + 1
    rep = {
        "tool": {"name": "qcompile", "command": opts.argv},
        "model": {"source": res.source, "path": str(res.path), "name": res.name,
                  "architecture": cfg.arch.hf_name, "parameters": n_params, "layers": cfg.num_layers,
                  "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
                  "tied_embeddings": cfg.tie_word_embeddings},
        "target": {"format": "gguf", "scheme": sch.name, "pure": sch.pure, "method": opts.method,
                   "file_type": int(sch.file_type)},
        "artifact": {"path": artifact.name, "bytes": size, "sha256": report.sha256_file(artifact),
                     "bits_per_weight": 8.0 * size / n_params},
        "tensor_types": types,
        "tensors": [{"name": p.name, "type": p.type.name, "shape": list(p.shape), "bytes": p.nbytes} for p in plan],
        "metrics": metrics,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": report.versions(),
    }
    report.write_report(out / "report.json", rep)
    rep["artifact"]["full_path"] = str(artifact)
    return rep


def verify(opts: Options, cfg: ModelConfig, ckpt: Checkpoint, model_dir: Path, gguf_path: Path,
           text: str) -> dict:
    """Reference-path metrics (PyTorch) and, when llama-cpp-python is installed, artifact-path metrics."""
    try:
        import torch
    except ImportError:
        raise QCompileError("--verify needs PyTorch (pip install torch), or pass --no-verify") from None
    if opts.threads:
        torch.set_num_threads(opts.threads)
    ids = evaluate.tokenize(model_dir, text)
    if len(ids) < 16:
        raise QCompileError(f"evaluation text has only {len(ids)} tokens; need at least 16")
    windows = evaluate.make_windows(ids, opts.eval_ctx, opts.eval_tokens)
    keep = min(128, windows.shape[1])
    with _progress(opts, total=cfg.num_layers, desc="verify (PyTorch)", unit="layer") as bar:
        ref, q_logits = evaluate.reference_eval(cfg, evaluate.CheckpointSource(ckpt),
                                                evaluate.GGUFSource(gguf_path, cfg),
                                                windows, keep_logits=keep, progress=lambda s: bar.update(1))
    out: dict = {"reference": ref.as_dict()}
    if llama_worker.available():
        try:
            got = llama_worker.logits(gguf_path, windows[0, :keep].tolist(), opts.threads)
        except RuntimeError as e:
            raise QCompileError(f"verification failed: llama.cpp could not run the GGUF ({e})") from None
        out["artifact"] = evaluate.compare_logits("llama.cpp", got, q_logits).as_dict()
    else:
        out["artifact"] = None
        _log(opts, "note: llama-cpp-python is not installed; skipped the in-runtime check")
    return out
