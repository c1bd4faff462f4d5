"""The compile plan: every decision of a run, made and checked once, before any work.

:func:`build` turns the command's :class:`Options` into a :class:`CompilePlan`: the target (``exporters``
registry), the resolved checkpoint and its config, the method, every tensor's type (the target's
``assign``), the size budget, the artifact's path, the predicted cost (refused when it cannot fit), the
packaging plan and the quality gate. Every check of the options happens here, so bad input fails before a
download or a minute of work. The pipeline (:mod:`qcompile.pipeline`) then runs the stages over the plan;
the plan also carries the run's state between them (tokens, engine, errors, allocation).
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

import exporters
import quantizers
from exporters.target import Target
from qcompile import budget as mix
from qcompile import cost, gate, packaging
from qcompile.errors import QCompileError, UsageError
from qcompile.model import Checkpoint, ModelConfig, Vocab, read_config
from qcompile.report import load_report
from qcompile.report_types import Gate, Metrics, Report
from qcompile.resolve import resolve
from quantizers.error import ErrorTally


@dataclass
class Options:
    model: str
    out: Path
    to: str = "gguf"
    bits: int | None = None
    quant: str | None = None
    pure: bool = False
    method: str = "auto"
    calib: str | None = None
    calib_samples: int | None = None
    calib_seqlen: int | None = None
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    calib_cache: Path | None = None   # calibration tokens and calibrated layers shared by compiles (qcompile build)
    force: bool = False
    verify: bool = True
    eval_text: Path | None = None
    eval_ctx: int = 256
    eval_tokens: int = 1024
    family: str = "instruct"
    offline: bool = False
    allow_pickle: bool = False
    keep_embeddings_fp: bool = False
    float_activations: bool = False
    package: str | None = None        # ollama | lmstudio | all (GGUF only)
    mmproj: str = "auto"              # a multimodal checkpoint's vision tower beside the GGUF: auto (f16) | f16 | q8_0 | none
    no_mtp: bool = False              # drop a hybrid checkpoint's multi-token-prediction layers (default: carried)
    max_size: str | None = None       # GGUF size budget ("491400096", "468.6MiB", "0.49GB")
    target_bpw: float | None = None   # or as bits per weight over all parameters
    threads: int | None = None
    dry_run: bool = False             # print the predicted memory and time per stage, then stop
    memory_check: bool = True         # refuse a run predicted not to fit in the available memory
    baseline: Path | None = None      # quality gate (qcompile.gate): an earlier report.json to compare with
    max_kld: str | None = None        # ... and its budgets, as `qcompile check` takes them
    max_ppl_increase: str | None = None
    max_top1_drop: float | None = None
    quiet: bool = False
    argv: list[str] = field(default_factory=list)


@dataclass
class CompilePlan:
    """A run's decisions (set by :func:`build`) and, as the stages go, its state. Targets read it as ``job``."""
    opts: Options
    target: Target
    res: Any = None                      # qcompile.resolve.Resolved
    cfg: ModelConfig | None = None
    ckpt: Checkpoint | None = None
    vocab: Vocab | None = None           # read by targets that embed the vocabulary (GGUF)
    method: quantizers.Method | None = None
    n_params: int = 0
    shapes: cost.Shapes | None = None
    budget: mix.Budget | None = None     # a size budget (--max-size, --target-bpw, or --bits 4's own size)
    sizes: mix.SizeModel | None = None
    scheme_name: str = ""
    artifact: Path | None = None
    cost: cost.Plan | None = None
    quality_gate: QualityGate | None = None
    package: Any = None                  # packaging.plan(...) when --package is given
    eval_text: str | None = None         # the verification text (--eval-text, or the built-in one)
    # the run's state, filled in by the stages
    tokens: np.ndarray | None = None
    calib_info: str | None = None
    device: str = "cpu"
    engine: Any = None                   # calibration.capture.LayerwiseEngine for a calibrated method
    allocation: dict | None = None       # report.json's allocation section, when a budget chose the types
    errors: ErrorTally = field(default_factory=ErrorTally)
    timings: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)   # when planning began (report's total time)
    _held: ExitStack = field(default_factory=ExitStack)

    @property
    def calibrated(self) -> bool:
        """Whether the run reads calibration tokens: a calibrated method, or a budget's sensitivity analysis."""
        return self.method.needs_calibration or self.budget is not None

    @contextmanager
    def stage(self, name: str):
        """Time a stage into ``timings`` (report.json's ``timings_s``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def progress(self, **kw):
        return progress(self.opts, **kw)

    def log(self, msg: str) -> None:
        log(self.opts, msg)

    def hold(self, resource):
        """Enter a context manager for the rest of the run (a target's spill files, kept until the report)."""
        return self._held.enter_context(resource)

    def release(self) -> None:
        self._held.close()


def progress(opts: Options, **kw):
    from tqdm import tqdm
    return tqdm(disable=opts.quiet, file=sys.stderr, dynamic_ncols=True, **kw)


def log(opts: Options, msg: str) -> None:
    if not opts.quiet:
        print(msg, file=sys.stderr)


def build(opts: Options, announce: bool = True) -> CompilePlan:
    """Every decision and check of a run, in the order that fails cheapest first: options, then the config
    (no tensor read), then the types, the budget and the predicted cost, then the output folder. With
    ``opts.dry_run`` it stops before the output folder (``announce``: print the cost table)."""
    t0 = time.perf_counter()
    if opts.max_size is not None and opts.target_bpw is not None:
        raise UsageError("--max-size and --target-bpw are two ways to give one budget: pass one of them")
    target = exporters.get(opts.to)
    target.check(opts)          # before resolving: an option the format cannot honour fails without a download
    package_targets = packaging.parse_targets(opts.package)
    job = CompilePlan(opts, target, quality_gate=QualityGate.from_options(opts), t0=t0)
    job.res = resolve(opts.model, family=opts.family, offline=opts.offline)
    job.cfg = read_config(job.res.path, mtp=not opts.no_mtp)
    target.prepare(job)
    needs_statistics = target.needs_statistics(job)
    job.method = choose_method(opts, target.low_bit(job), needs_statistics)
    if job.cfg.arch.moe:
        job.method = moe_method(opts, job.cfg, target, job.method, needs_statistics)
    if job.cfg.arch.hybrid:
        hybrid_check(job.cfg, target)
    # load (lazily: headers only; tensors stream during quantization)
    job.ckpt = Checkpoint(job.res.path, job.cfg, allow_pickle=opts.allow_pickle)
    job.shapes = cost.Shapes.of(job.cfg)
    job.n_params = sum(int(np.prod(job.ckpt.entry(n).shape)) for n in job.cfg.expected_tensor_names())
    target.assign(job)
    if target.sized:  # fails now if the budget cannot be met
        # (an MoE's --bits 4 keeps Q4_K_M's own types: the sensitivity analysis does not cover experts yet)
        job.budget, job.sizes = budget_sizes(opts, job, preset_sized=preset_sized(opts, job.method)
                                             and not job.cfg.arch.moe)
    job.scheme_name = target.scheme_name(job) if job.budget is None else \
        f"MIX-{8 * job.budget.bytes / job.n_params:.2f}bpw"
    artifact_bytes, rtn_work, export_to = target.cost_inputs(job)
    job.cost = cost_plan(opts, job.cfg, job.method, calibrated=job.calibrated, budget=job.budget is not None,
                         artifact_bytes=artifact_bytes, rtn_work=rtn_work,
                         timed=opts.dry_run or long_run(job.calibrated, job.n_params), export_to=export_to)
    check_plan(opts, job.cost, announce)
    if opts.dry_run:
        return job
    job.artifact = target.artifact_path(job)
    check_output(opts.out, job.artifact, opts.force)
    job.eval_text = eval_text(opts) if opts.verify else None
    if package_targets:  # before quantizing: a template or an existing output it cannot handle fails now
        job.package = packaging.plan(package_targets, out=opts.out, artifact=job.artifact, model_dir=job.res.path,
                                     name=job.res.name, repo=job.res.repo, scheme=job.scheme_name, force=opts.force,
                                     quiet=opts.quiet, projector=next(iter(target.companion_paths(job)), None))
    job.timings["resolve"] = time.perf_counter() - t0
    return job


def choose_method(opts: Options, low_bit: bool, imatrix_required: bool = False) -> quantizers.Method:
    """``auto``: for low-bit targets, GPTQ when calibration data is given (``--calib``), imatrix-weighted
    RTN on self-generated text for ``--bits 4`` without it; RTN otherwise (8-bit and float types gain
    nothing measurable from calibration).

    Why imatrix without ``--calib``: on held-out text unlike any calibration (benchmarks/unseen_bench.py,
    the real 0.5B, four domains), GPTQ on 32 x 256 self-generated tokens was worse than plain RTN on C code
    and non-English text (KLD 0.02162 vs 0.02042, 0.03673 vs 0.03510), while imatrix on the same tokens
    beats RTN on all four sets (mean 0.02378 vs 0.02666). GPTQ fits the calibration tokens' subspace, which
    a few thousand of the model's own chat tokens span too thinly; the imatrix only reweights the rounding."""
    name = opts.method
    if name == "auto":
        if not low_bit:
            name = "rtn"
        elif opts.calib:
            name = "gptq"
        else:
            name = "imatrix" if opts.bits == 4 or imatrix_required else "rtn"
    method = quantizers.get(name)
    if imatrix_required and not method.needs_calibration:
        raise UsageError(f"{opts.quant}: its codebook types need calibration statistics (llama-quantize refuses "
                         f"them without an imatrix): use --method imatrix or gptq (with --calib FILE, or none "
                         f"for self-calibration), not --method {name}")
    return method


def moe_method(opts: Options, cfg: ModelConfig, target: Target, method: quantizers.Method,
               needs_statistics: bool = False) -> quantizers.Method:
    """What a mixture-of-experts model can be compiled with: any method (the calibration engine routes the
    calibration tokens with the full-precision router and calibrates each expert on its own,
    :meth:`calibration.capture.LayerwiseEngine._quantize_experts`) to GGUF (llama.cpp's mixes or a size
    budget over every tensor, experts included), ONNX and OpenVINO (one grid); a target that cannot write
    experts is refused here, in one place."""
    what = f"{cfg.arch.hf_name} (mixture of experts)"
    if not target.experts:
        raise UsageError(f"--to {target.name}: {what} models cannot be written to {target.name}")
    return method


def hybrid_check(cfg: ModelConfig, target: Target) -> None:
    """What a linear-attention hybrid (Qwen3.5, Qwen3-Next) can be compiled with, refused here in one line naming
    the limitation (``Target.hybrid_limitation``): GGUF only."""
    if not target.hybrid:
        raise UsageError(f"--to {target.name}: {cfg.arch.hf_name} (linear-attention hybrid) models cannot be "
                         f"written to {target.name}: {target.hybrid_limitation}; use --to gguf")


def calibration_shape(opts: Options, device: str) -> tuple[str, int, int]:
    """(source, samples, tokens per sample) of the calibration: ``self`` 32 x 256 unless told otherwise, a
    file or dataset 128 x 512 (x 2048 on CUDA)."""
    from calibration.selfgen import SELF_SAMPLES, SELF_SEQLEN
    spec = opts.calib or "self"
    if spec == "self":
        return spec, opts.calib_samples or SELF_SAMPLES, opts.calib_seqlen or SELF_SEQLEN
    return spec, opts.calib_samples or 128, opts.calib_seqlen or (2048 if device.startswith("cuda") else 512)


def cost_plan(opts: Options, cfg: ModelConfig, method: quantizers.Method, *, calibrated: bool, budget: bool,
              artifact_bytes: int, rtn_work: dict[tuple, int], timed: bool,
              export_to: str | None = None) -> cost.Plan:
    """The run's stages with their predicted peak memory and (``timed``: probes the machine) wall time.
    ``rtn_work``: (type, row length) -> values that RTN writes; ``export_to``: a folder target's name
    (``onnx``/``openvino``; None for GGUF, which writes as it quantizes)."""
    device = opts.device if opts.device != "auto" else "cpu"
    spec, n, seqlen = calibration_shape(opts, device)
    shapes = cost.Shapes.of(cfg)
    inf = float("inf")
    flops = calibrated or budget or method.needs_calibration or export_to is not None or opts.verify
    r = cost.rates(opts.threads, flops) if timed else cost.Rates(*(inf,) * 6)
    seconds = (lambda work: cost.rtn_seconds(work, opts.threads)) if timed else (lambda work: 0.0)
    stages: list[cost.Stage] = []
    if calibrated and spec == "self":
        q8 = {(T.Q8_0, cols): v for (_, cols), v in rtn_work.items()}
        stages += cost.self_generation(shapes, r, n, seqlen, seconds(q8))
    if budget:
        from calibration.sensitivity import SAMPLES, SEQLEN
        predict = cost.prediction_work(rtn_work, imatrix=method.needs_calibration)
        stages.append(cost.sensitivity(shapes, r, min(n, SAMPLES), min(seqlen, SEQLEN), seconds(predict)))
    if method.needs_calibration:
        stages.append(cost.engine(shapes, r, n, seqlen, method.hessian, method.samples))
    else:
        stages.append(cost.rtn_stream(shapes, r, seconds(rtn_work)))
    if export_to is not None:
        stages.append(cost.folder_export(shapes, r, export_to))
    if opts.verify:
        stages += cost.verify(shapes, r, opts.eval_tokens, artifact_bytes)
    return cost.Plan(stages)


def check_plan(opts: Options, plan: cost.Plan, announce: bool = True) -> None:
    """Print the plan (``--dry-run``: per stage) and refuse one that cannot fit in the available memory."""
    if opts.dry_run and announce:
        print(plan.table())
    elif not opts.quiet and plan.seconds != float("inf"):
        log(opts, plan.summary())
    avail = cost.available_memory()
    peak = plan.peak
    if opts.memory_check and avail is not None and peak.anon > avail:
        raise QCompileError(f"predicted peak memory {peak.anon / cost.GB:.1f} GB ({peak.name}) exceeds the "
                            f"{avail / cost.GB:.1f} GB available; lower it with {peak.lower or '--threads'}, or "
                            "run anyway with --no-memory-check")


def long_run(calibrated: bool, n_params: int) -> bool:
    """Whether a run is long enough for its predicted cost to be printed (the probes take a second)."""
    return calibrated or n_params >= 1_000_000_000


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


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


@dataclass
class QualityGate:
    """The compile's own ``qcompile check``: budgets on the verified metrics, applied before the artifact is
    renamed into place (a failing artifact is never published)."""
    budgets: gate.Budgets
    baseline: Report | None
    baseline_path: Path | None

    @classmethod
    def from_options(cls, opts: Options) -> QualityGate | None:
        """None without budgets; a one-line error now (before any work) for budgets that cannot apply."""
        budgets = gate.Budgets(opts.max_kld, opts.max_ppl_increase, opts.max_top1_drop)
        if opts.baseline is None and not budgets.any():
            return None
        if not opts.verify:
            raise UsageError("--max-kld/--baseline judge the verification's metrics: drop --no-verify")
        base = load_report(opts.baseline) if opts.baseline is not None else None
        gate.validate(budgets, base)
        if base is not None and (ctx := gate.reference(base, opts.baseline).ctx) != opts.eval_ctx:
            raise QCompileError(f"--baseline {opts.baseline}: evaluated with --eval-ctx {ctx}, this run with "
                                f"{opts.eval_ctx} (not comparable)")
        return cls(budgets, base, opts.baseline)

    def judge(self, metrics: Metrics, size: int, n_params: int) -> Gate:
        """The report's ``gate`` section; raises (exit 1, one line with the measured figures) on a violation."""
        ok, bad = gate.judge(metrics.reference, size, n_params, self.baseline, self.budgets)
        if bad:
            raise QCompileError("quality gate failed: " + "; ".join(bad) + "; the artifact was not written")
        return Gate(str(self.baseline_path) if self.baseline_path else None, ok)


def preset_sized(opts: Options, method: quantizers.Method) -> bool:
    """Whether ``--bits 4`` is a size rather than a recipe: with a calibrated method (imatrix on self-generated
    text without ``--calib``, GPTQ with it) the GGUF gets the bytes of llama.cpp's Q4_K_M mix, spent by
    measured sensitivity as ``--max-size`` spends them (``--quant Q4_K_M`` keeps llama.cpp's own types).

    Why: on held-out text of four domains unlike any calibration (benchmarks/unseen_bench.py, the real 0.5B),
    imatrix with Q4_K_M's types scored mean KLD 0.02378 = 0.97x llama.cpp's Q4_K_M + imatrix (0.92-1.04x
    per set); the same imatrix and tokens with the types chosen at the same byte count scored 0.01426 =
    0.58x (0.52-0.65x per set). With a file (benchmarks/quality.py: 128 x 512 windows of brown + python-docs,
    llama-imatrix on the identical windows), GPTQ with Q4_K_M's types scored 0.01873 = 0.76x the imatrix
    peer on the unseen mean, GPTQ with the types chosen at llama.cpp's Q4_K_M byte count 0.01372 = 0.56x.
    The budget moves bytes from the Q8_0 output matrix to attention and ffn_down, where the Fisher says the
    KLD comes from."""
    return (opts.quant is None and (opts.bits or 4) == 4 and not opts.pure
            and opts.max_size is None and opts.target_bpw is None and method.needs_calibration)


def budget_sizes(opts: Options, job: CompilePlan, preset_sized: bool = False
                 ) -> tuple[mix.Budget | None, mix.SizeModel | None]:
    """The size budget (None without --max-size/--target-bpw, unless ``preset_sized``: the base scheme's own
    size) and the file's size model around the sized target's base plan (``job.target.types``: the GGUF
    target's planned tensors, vocabulary and header metadata). A budget no choice of candidates can meet is an
    error here, before any work."""
    from exporters.gguf import header_bytes
    budget = mix.parse_budget(opts.max_size, opts.target_bpw, job.n_params)
    if budget is None and not preset_sized:
        return None, None
    types, cfg = job.target.types, job.cfg
    sch, plan = types.scheme, types.plan
    if budget is not None and not sch.quantized:
        raise UsageError(f"{budget.request}: the base scheme {sch.name} is not quantized; use --bits or a "
                         "quantized --quant (its types are kept for the embeddings)")
    sizes = mix.size_model(plan, cfg, header_bytes(cfg, types.vocab, plan, **types.meta))
    if budget is None:  # the base mix's own bytes: one of the allocations, so always within reach
        return mix.Budget(mix.base_bytes(sizes, plan), f"--bits 4 (the size of {sch.name})"), sizes
    mix.check_budget(budget, sizes, job.n_params)
    return budget, sizes


def eval_text(opts: Options) -> str:
    from qcompile.tiny import builtin_text
    if not opts.eval_text:
        return builtin_text()
    try:
        return opts.eval_text.read_text(encoding="utf-8")
    except OSError as e:
        raise QCompileError(f"--eval-text {opts.eval_text}: {e.strerror}") from None
