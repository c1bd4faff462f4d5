"""The compile pipeline, one for every target: plan -> calibrate -> [allocate] -> quantize + export -> verify ->
publish -> report -> package.

:func:`qcompile.plan.build` makes every decision first (and fails on bad input before any work); the stages
below then run over the plan, asking its target (``exporters``) where formats differ. Stage timings come from
the plan's stage runner (``job.stage``), progress bars from ``job.progress``.

- calibrate: the calibration tokens (a file, a dataset, or self-generated with llama.cpp) when the method
  or a size budget needs them;
- allocate: with a size budget, each tensor's type by measured sensitivity (:mod:`qcompile.budget`);
- quantize + export: ``target.produce`` (the layer engine of :mod:`calibration.capture` feeds it for a
  calibrated method); nothing is in place yet;
- verify: the PyTorch reference (full precision vs the artifact's weights, ``target.reference``) and the
  artifact in its own runtime (``target.runtime_logits``) vs the dequantized model; then the quality gate;
- publish (``target.publish``), report.json, and the packages (GGUF: Ollama, LM Studio).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from gguf.utility import size_label

import quantizers
from calibration.capture import LayerwiseEngine, fingerprint
from exporters.gguf import (
    PlannedTensor,
    quantized_chunks,
    tensor_plan,
    write_gguf,
)
from exporters.target import Output
from qcompile import budget as mix
from qcompile import evaluate, llama_worker, packaging, report
from qcompile.calib_cache import CalibCache, model_identity, source_identity
from qcompile.calib_cache import key as calib_key
from qcompile.errors import QCompileError
from qcompile.model import (
    Checkpoint,
    CheckpointSource,
    ModelConfig,
    WeightSource,
    load_vocab,
)
from qcompile.plan import CompilePlan, Options, build, calibration_shape, resolve_device
from qcompile.plan import log as _log
from qcompile.plan import progress as _progress
from qcompile.report_types import ExpertCoverage, Metrics, ModelInfo, Report, Tool
from quantizers.schemes import scheme

__all__ = ["Options", "compile_model"]


def compile_model(opts: Options) -> dict:
    """Run the whole pipeline; return the report written beside the artifact (``{"dry_run": cost plan}``
    with ``--dry-run``)."""
    job = build(opts)
    if opts.dry_run:
        return {"dry_run": job.cost}
    try:
        return run(job)
    finally:
        job.release()


def run(job: CompilePlan) -> dict:
    """The stages over a built plan (see the module docstring)."""
    opts, target = job.opts, job.target
    out: Output | None = None
    try:
        cache = CalibCache(opts.calib_cache) if opts.calib_cache is not None else None
        if opts.threads and job.calibrated:
            # --threads for the calibration's torch work too: its float sums (so the rounding of a tie, so the
            # bytes) depend on the thread count, which must not depend on where the compile ran (a Ray worker's
            # torch starts with its task's CPUs)
            import torch
            torch.set_num_threads(opts.threads)
        if job.calibrated:
            with job.stage("calibrate"):
                job.device = resolve_device(opts.device)
                job.tokens, job.calib_info = cached_calibration_tokens(opts, job, cache)
                _log(opts, f"calibration: {job.calib_info}")
        if job.budget is not None:
            with job.stage("sensitivity"):
                allocate(job)
        if job.method.needs_calibration:
            fp = fingerprint(job.res.path.resolve(), job.tokens.tobytes(), job.method.name, *target.fingerprint(job))
            work, resume = target.work_dir(job), opts.resume
            if cache is not None:   # the calibrated layers of this model, tokens, method and grid: shared, kept
                work, resume = cache.engine_dir(fp), True
                job.hold(cache.locked(work.name))
            job.engine = LayerwiseEngine(job.cfg, CheckpointSource(job.ckpt), job.tokens, target.engine_types(job),
                                         job.method, device=job.device, work_dir=work, resume=resume, fingerprint=fp,
                                         keep=cache is not None)
            if cache is not None and job.engine.done >= 0:
                job.calib_info += (f"; {job.engine.done + 1} of {job.cfg.num_layers} calibrated layers from "
                                   f"--calib-cache (same tokens, method and grid)")
        out = target.produce(job)
        metrics = Metrics()
        if opts.verify:
            with job.stage("verify"):
                metrics = verify(job, out, job.eval_text or "")
        gate = (job.quality_gate.judge(metrics, sum(f.stat().st_size for f in _written(out)), job.n_params)
                if job.quality_gate else None)
        target.publish(job, out)
        if job.engine is not None:
            job.engine.finish()
    except BaseException:
        target.discard(job, out)
        raise
    job.timings["total"] = time.perf_counter() - job.t0
    rep = Report(tool=Tool("qcompile", opts.argv), model=model_info(job.res, job.cfg, job.n_params),
                 **target.report(job, out), metrics=metrics, gate=gate, experts=expert_coverage(job),
                 timings_s={k: round(v, 3) for k, v in job.timings.items()}, versions=report.versions())
    report.write_report(opts.out / "report.json", rep)
    if job.package is not None:
        # the artifact and its report stand on their own; the package stage adds to them or leaves no trace
        packaging.finish(job.package, rep, opts.out / "report.json")
    result = rep.to_dict()
    result["artifact"]["full_path"] = str(out.main)
    return result


def expert_coverage(job: CompilePlan) -> list[ExpertCoverage] | None:
    """report.json's ``experts``: each MoE layer's tokens per expert and blend, from the calibration engine."""
    got = getattr(job.engine, "experts", None)
    if not got:
        return None
    return [ExpertCoverage(i, [e["tokens"] for e in got[i]], [e["blend"] for e in got[i]],
                           [e.get("method", job.method.name) for e in got[i]]) for i in sorted(got)]


def _written(out: Output) -> list[Path]:
    """The files of an output as they are on disk now (a GGUF still under its temporary name)."""
    return [out.pending] if out.pending is not None else out.files


def cached_calibration_tokens(opts: Options, job: CompilePlan, cache: CalibCache | None) -> tuple[np.ndarray, str]:
    """The calibration tokens, from ``--calib-cache`` when another compile of the same model and calibration
    made them (keyed by the model's files, the source's content, samples, length, seed and device)."""
    make = lambda: calibration_tokens(opts, job.res, job.cfg, job.ckpt, job.device)  # noqa: E731
    if cache is None:
        return make()
    spec, n, seqlen = calibration_shape(opts, job.device)
    k = calib_key(model_identity(job.res.path), source_identity(spec), n, seqlen, opts.seed, job.device)
    tokens, info, shared = cache.tokens(k, make)
    return tokens, info + ("; tokens from --calib-cache" if shared else "")


def calibration_tokens(opts: Options, res, cfg: ModelConfig, ckpt: Checkpoint, device: str
                       ) -> tuple[np.ndarray, str]:
    """The calibration token windows and a one-line description of where they came from."""
    from calibration.sources import calibration_tokens as load
    spec, n, seqlen = calibration_shape(opts, device)
    if spec == "self":
        what = (f"self-generated by the model ({n} x {seqlen} tokens, seed {opts.seed}, llama.cpp from a Q8_0 "
                f"copy{'; no --calib given, offline default' if not opts.calib else ''})")
        return self_generated(opts, res, cfg, ckpt, n, seqlen), what
    return load(spec, res.path, n, seqlen, opts.seed), f"{spec} ({n} x {seqlen} tokens, seed {opts.seed})"


def self_generated(opts: Options, res, cfg: ModelConfig, ckpt: Checkpoint, n: int, seqlen: int) -> np.ndarray:
    """``--calib self``: stream a Q8_0 GGUF of the checkpoint into the output folder (a hidden temporary,
    removed afterwards), then sample from it with llama.cpp (:mod:`calibration.selfgen`). Memory: one
    tensor while writing, the memory-mapped file while sampling."""
    from calibration import selfgen
    if not llama_worker.available():
        raise QCompileError("self-generated calibration (the default of --bits 4 without --calib) samples with "
                            "llama.cpp: pip install 'qcompile[llama]', or pass --calib FILE")
    sch = scheme("Q8_0")
    plan = tensor_plan(cfg, ckpt, sch)
    n_params = sum(int(np.prod(p.shape)) for p in plan)
    opts.out.mkdir(parents=True, exist_ok=True)
    tmp = opts.out / f".selfgen-{os.getpid()}.Q8_0.gguf"
    try:
        with _progress(opts, total=sum(p.nbytes for p in plan), unit="B", unit_scale=True,
                       desc="self-calibration: Q8_0 copy") as bar:
            write_gguf(tmp, cfg, load_vocab(res.path, cfg.vocab_size), plan,
                       lambda p: quantized_chunks(ckpt, p, None, opts.threads), name=res.name,
                       size_label=size_label(n_params, 0, 0, 0), file_type=sch.file_type, on_bytes=bar.update)
        _log(opts, f"self-calibration: sampling {n} x {seqlen} tokens with llama.cpp")
        try:
            return selfgen.generate(tmp, res.path, n, seqlen, opts.seed, opts.threads)
        except RuntimeError as e:  # the child process failed (llama_worker's message names why)
            raise QCompileError(f"self-generated calibration failed: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def model_info(res, cfg: ModelConfig, n_params: int) -> ModelInfo:
    """report.json's ``model`` section (the same for every target)."""
    return ModelInfo(source=res.source, path=str(res.path), name=res.name, architecture=cfg.arch.hf_name,
                     parameters=n_params, layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                     vocab_size=cfg.vocab_size, tied_embeddings=cfg.tie_word_embeddings)


def allocate(job: CompilePlan) -> None:
    """With a size budget: each tunable tensor's type by sensitivity, within the budget; the plan's types and
    ``job.allocation`` (report.json's section) are replaced, the size model checked against the writer."""
    types = job.target.types
    types.plan, job.allocation = budget_plan(job.opts, job.cfg, job.ckpt, types.plan, job.sizes, job.budget,
                                             job.tokens, job.method, job.device)
    # the size model against the writer's own metadata: the exact file size, within the budget
    planned = job.target.size(job)
    if not job.allocation["bytes"] == planned <= job.budget.bytes:
        raise RuntimeError(f"size model: {job.allocation['bytes']} bytes planned, {planned} in the file, "
                           f"budget {job.budget.bytes}")


def budget_plan(opts: Options, cfg: ModelConfig, ckpt: Checkpoint, plan: list[PlannedTensor],
                sizes: mix.SizeModel, budget: mix.Budget, tokens: np.ndarray, method: quantizers.Method,
                device: str) -> tuple[list[PlannedTensor], dict]:
    """The plan with each tunable tensor's type chosen by sensitivity to fit ``budget``, and report.json's
    ``allocation`` section. The proxy quantizer is RTN, imatrix-weighted for the calibrated methods (GPTQ
    and AWQ land below its error on the decoder linears, about equally across types); a GPTQ run's output
    matrix, which GPTQ rounds too, is predicted at GPTQ's measured error (far below RTN's there)."""
    from calibration.sensitivity import SAMPLES
    with _progress(opts, desc="sensitivity", total=min(SAMPLES, len(tokens)) + len(sizes.options)) as bar:
        predicted, info = mix.analyse(cfg, CheckpointSource(ckpt), plan, sizes, tokens,
                                      use_imatrix=method.needs_calibration, gptq_head=method.hessian,
                                      device=device, seed=opts.seed,
                                      threads=opts.threads,
                                      progress=lambda s: (bar.set_postfix_str(s, refresh=False), bar.update()))
    chosen, alloc = mix.choose_mix(plan, sizes, predicted, budget)
    section = mix.report(budget, sizes, plan, alloc, predicted, info)
    _log(opts, f"{budget.request}: {section['bytes']} bytes, predicted KLD {alloc.kld:.5f} (base mix "
               f"{section['base_predicted_kld']:.5f} at {section['base_bytes']} bytes)")
    return chosen, section


def _reference_check(opts: Options, cfg: ModelConfig, ckpt: Checkpoint, model_dir: Path,
                     quant: WeightSource, text: str) -> tuple[evaluate.ReferenceMetrics, np.ndarray, np.ndarray]:
    """The reference path of verification: fp vs ``quant`` in PyTorch on the evaluation text. Returns the
    metrics, the quantized logits of the first window's first tokens and those tokens (for the runtime check)."""
    try:
        import torch
    except ImportError:
        raise QCompileError("--verify needs PyTorch (pip install torch), or pass --no-verify") from None
    if opts.threads:
        torch.set_num_threads(opts.threads)
    ids = evaluate.tokenize(model_dir, text)
    if len(ids) < 16:
        raise QCompileError(f"evaluation text has only {len(ids)} tokens; need at least 16")
    windows, score = evaluate.make_windows(ids, opts.eval_ctx, opts.eval_tokens)
    keep = min(128, windows.shape[1])
    with _progress(opts, total=cfg.num_layers, desc="verify (PyTorch)", unit="layer") as bar:
        ref, q_logits = evaluate.reference_eval(cfg, CheckpointSource(ckpt), quant, windows,
                                                keep_logits=keep, progress=lambda s: bar.update(1), score=score)
    return ref, q_logits, windows[0, :keep]


def verify(job: CompilePlan, out: Output, text: str) -> Metrics:
    """Reference-path metrics (fp vs the artifact's weights, PyTorch) and the artifact's runtime logits vs the
    dequantized model (``None`` when that runtime is not installed: llama-cpp-python is optional)."""
    ref, q_logits, tokens = _reference_check(job.opts, job.cfg, job.ckpt, job.res.path, job.target.reference(job, out),
                                             text)
    got = job.target.runtime_logits(job, out, tokens)
    if got is None:
        _log(job.opts, f"note: the {job.target.runtime} runtime is not installed; skipped the in-runtime check")
        return Metrics(ref, None)
    return Metrics(ref, evaluate.compare_logits(job.target.runtime, got, q_logits))
