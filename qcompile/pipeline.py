"""The compile pipeline, top to bottom: resolve -> load (streaming) -> quantize -> export -> verify -> finalize.

(Calibration slots in between load and quantize when a calibrated method is chosen, and so does the
sensitivity analysis that chooses each tensor's type when a size budget is given: ``--max-size``.)
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.utility import size_label

from exporters.gguf import PlannedTensor, file_size, header_bytes, write_gguf
from qcompile import budget as mix, cost, evaluate, gate, llama_worker, packaging, report
from qcompile.arch import ModelConfig, read_config
from qcompile.checkpoint import Checkpoint
from qcompile.spill import Spill, release
from qcompile.errors import QCompileError, UsageError, is_write_error, write_failed
from qcompile.report import read_report
from qcompile.resolve import resolve
from qcompile.tokenizer import Vocab, load_vocab
import quantizers
from calibration.capture import LayerwiseEngine, fingerprint
from quantizers import rtn
from quantizers.error import ErrorTally
from quantizers.schemes import BITS_PRESET, Scheme, scheme
from quantizers.grids import GRIDS, IntType, parse_type
from quantizers.tensor import QuantizedTensor


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


def choose_scheme(opts: Options) -> Scheme:
    if opts.quant:
        return scheme(opts.quant, pure=opts.pure)
    return scheme(BITS_PRESET[opts.bits or 4], pure=opts.pure)


def needs_imatrix(sch: Scheme) -> bool:
    """Mixes with tensors llama.cpp will not round without an importance matrix (IQ3_XXS and IQ2_S:
    llama-quantize refuses them without ``--imatrix``)."""
    return sch.base in (T.IQ3_XXS,)


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
        stages.append(cost.engine(shapes, r, n, seqlen, method.hessian, method.awq))
    else:
        stages.append(cost.rtn_stream(shapes, r, seconds(rtn_work)))
    if export_to is not None:
        stages.append(cost.folder_export(shapes, r, export_to))
    if opts.verify:
        stages += cost.verify(shapes, r, opts.eval_tokens, artifact_bytes)
    return cost.Plan(stages)


def check_plan(opts: Options, plan: cost.Plan) -> None:
    """Print the plan (``--dry-run``: per stage) and refuse one that cannot fit in the available memory."""
    if opts.dry_run:
        print(plan.table())
    elif not opts.quiet and plan.seconds != float("inf"):
        _log(opts, plan.summary())
    avail = cost.available_memory()
    peak = plan.peak
    if opts.memory_check and avail is not None and peak.anon > avail:
        raise QCompileError(f"predicted peak memory {peak.anon / cost.GB:.1f} GB ({peak.name}) exceeds the "
                            f"{avail / cost.GB:.1f} GB available; lower it with {peak.lower or '--threads'}, or "
                            "run anyway with --no-memory-check")


def long_run(calibrated: bool, n_params: int) -> bool:
    """Whether a run is long enough for its predicted cost to be printed (the probes take a second)."""
    return calibrated or n_params >= 1_000_000_000


def self_generated(opts: Options, res, cfg: ModelConfig, ckpt: Checkpoint, n: int, seqlen: int) -> np.ndarray:
    """``--calib self``: stream a Q8_0 GGUF of the checkpoint into the output folder (a hidden temporary,
    removed afterwards), then sample from it with llama.cpp (:mod:`calibration.selfgen`). Memory: one
    tensor while writing, the memory-mapped file while sampling."""
    from calibration import selfgen
    if not llama_worker.available():
        raise QCompileError("self-generated calibration (the default of --bits 4 without --calib) samples with "
                            "llama.cpp: pip install 'qcompile[llama]', or pass --calib FILE")
    sch = scheme("Q8_0")
    plan = make_plan(cfg, ckpt, sch)
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


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def quantized_chunks(ckpt: Checkpoint, p: PlannedTensor, engine, threads: int | None,
                     errors: ErrorTally | None = None) -> Iterator[QuantizedTensor]:
    """One tensor's quantized rows: from the calibration engine for what it produced (decoder linears;
    norms and biases that AWQ folded scales into) when a calibrated method runs, else streamed from the
    checkpoint through RTN, row-chunk by row-chunk. ``errors`` gets the tensor's reconstruction error
    (measured on each chunk while its float rows are in memory, or taken from the engine)."""
    layer = engine.layer(int(p.name.split(".")[1])) if engine is not None and p.name.startswith("blk.") else {}
    if p.source in layer:
        qt = layer[p.source]
        if qt.type != p.type:
            raise RuntimeError(f"{p.name}: engine produced {qt.type.name}, planned {p.type.name}")
        if errors is not None:
            errors.take(engine.errors, p.source, as_name=p.name)
        yield QuantizedTensor(p.name, qt.type, qt.shape, qt.data)
        return
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


TARGETS = ("gguf", "onnx", "openvino")


def model_info(res, cfg: ModelConfig, n_params: int) -> dict:
    """report.json's ``model`` section (the same for every target)."""
    return {"source": res.source, "path": str(res.path), "name": res.name, "architecture": cfg.arch.hf_name,
            "parameters": n_params, "layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size, "tied_embeddings": cfg.tie_word_embeddings}


@dataclass
class QualityGate:
    """The compile's own ``qcompile check``: budgets on the verified metrics, applied before the artifact is
    renamed into place (a failing artifact is never published)."""
    budgets: gate.Budgets
    baseline: dict | None
    baseline_path: Path | None

    @classmethod
    def from_options(cls, opts: Options) -> QualityGate | None:
        """None without budgets; a one-line error now (before any work) for budgets that cannot apply."""
        budgets = gate.Budgets(opts.max_kld, opts.max_ppl_increase, opts.max_top1_drop)
        if opts.baseline is None and not budgets.any():
            return None
        if not opts.verify:
            raise UsageError("--max-kld/--baseline judge the verification's metrics: drop --no-verify")
        base = read_report(opts.baseline) if opts.baseline is not None else None
        gate.validate(budgets, base)
        if base is not None and (ctx := gate.reference(base, opts.baseline).get("ctx")) != opts.eval_ctx:
            raise QCompileError(f"--baseline {opts.baseline}: evaluated with --eval-ctx {ctx}, this run with "
                                f"{opts.eval_ctx} (not comparable)")
        return cls(budgets, base, opts.baseline)

    def judge(self, metrics: dict, size: int, n_params: int) -> dict:
        """The report's ``gate`` entry; raises (exit 1, one line with the measured figures) on a violation."""
        ok, bad = gate.judge(metrics["reference"], size, n_params, self.baseline, self.budgets)
        if bad:
            raise QCompileError("quality gate failed: " + "; ".join(bad) + "; the artifact was not written")
        return {"baseline": str(self.baseline_path) if self.baseline_path else None, "passed": ok}


def compile_model(opts: Options) -> dict:
    """Run the whole pipeline; return the report written beside the artifact."""
    if opts.to not in TARGETS:
        raise QCompileError(f"--to {opts.to}: not available yet; supported targets: {', '.join(TARGETS)}")
    if opts.package and opts.to != "gguf":
        raise UsageError(f"--package needs --to gguf (Ollama and LM Studio load GGUF files), not --to {opts.to}")
    if opts.max_size is not None and opts.target_bpw is not None:
        raise UsageError("--max-size and --target-bpw are two ways to give one budget: pass one of them")
    budget_opt = "--max-size" if opts.max_size is not None else "--target-bpw" if opts.target_bpw is not None else None
    if budget_opt and opts.to != "gguf":
        raise UsageError(f"{budget_opt} needs --to gguf (it chooses GGUF types per tensor), not --to {opts.to}")
    if budget_opt and opts.pure:
        raise UsageError(f"{budget_opt} chooses a type per tensor; --pure asks for one type everywhere")
    package_targets = packaging.parse_targets(opts.package)
    quality_gate = QualityGate.from_options(opts)
    if opts.to in ("onnx", "openvino"):
        return compile_folder(opts, quality_gate)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # resolve
    res = resolve(opts.model, family=opts.family, offline=opts.offline)
    cfg = read_config(res.path)
    vocab = load_vocab(res.path, cfg.vocab_size)
    sch = choose_scheme(opts)
    method = choose_method(opts, sch.quantized and sch.base not in (T.Q8_0, T.Q6_K), needs_imatrix(sch))
    # calibrated methods are llama-quantize --imatrix's counterpart: the mix rules that depend on an imatrix
    # (Q4_0/Q5_0's first ffn_down, IQ4's, IQ3_XXS's attn_v and ffn_down) follow that
    sch = replace(sch, has_imatrix=method.needs_calibration)
    # load (lazily: headers only; tensors stream during quantization)
    ckpt = Checkpoint(res.path, cfg, allow_pickle=opts.allow_pickle)
    plan = make_plan(cfg, ckpt, sch)
    n_params = sum(int(np.prod(p.shape)) for p in plan)
    meta = dict(name=res.name, size_label=size_label(n_params, 0, 0, 0), file_type=sch.file_type)
    budget, sizes = budget_sizes(opts, cfg, vocab, plan, sch, meta, n_params,  # fails now if it cannot be met
                                 preset_sized=preset_sized(opts, method))
    scheme_name = sch.name if budget is None else f"MIX-{8 * budget.bytes / n_params:.2f}bpw"
    calibrated = method.needs_calibration or budget is not None
    rtn_work: dict[tuple, int] = {}
    for p in plan:
        if len(p.shape) == 2:
            rtn_work[(p.type, p.shape[-1])] = rtn_work.get((p.type, p.shape[-1]), 0) + int(np.prod(p.shape))
    plan_cost = cost_plan(opts, cfg, method, calibrated=calibrated, budget=budget is not None,
                          artifact_bytes=budget.bytes if budget else sum(p.nbytes for p in plan), rtn_work=rtn_work,
                          timed=opts.dry_run or long_run(calibrated, n_params))
    check_plan(opts, plan_cost)
    if opts.dry_run:
        return {"dry_run": plan_cost}
    out = opts.out
    artifact = out / f"{res.name}-{scheme_name}.gguf"
    check_output(out, artifact, opts.force)
    pkg = None
    if package_targets:  # before quantizing: a template or an existing output it cannot handle fails now
        pkg = packaging.plan(package_targets, out=out, artifact=artifact, model_dir=res.path, name=res.name,
                             repo=res.repo, scheme=scheme_name, force=opts.force, quiet=opts.quiet)
    timings["resolve"] = time.perf_counter() - t0
    eval_text = _eval_text(opts) if opts.verify else None
    tmp = out / f".{artifact.name}.{os.getpid()}.tmp"
    try:
        # calibrate (+ sensitivity when a budget is given) -> quantize -> export, streamed tensor by tensor
        engine, calib_info, allocation = None, None, None
        if method.needs_calibration or budget is not None:
            t_cal = time.perf_counter()
            device = resolve_device(opts.device)
            tokens, calib_info = calibration_tokens(opts, res, cfg, ckpt, device)
            _log(opts, f"calibration: {calib_info}")
            timings["calibrate"] = time.perf_counter() - t_cal
        if budget is not None:
            t_s = time.perf_counter()
            plan, allocation = budget_plan(opts, cfg, ckpt, plan, sizes, budget, tokens, method, device)
            # the size model against the writer's own metadata: the exact file size, within the budget
            planned = file_size(cfg, vocab, plan, **meta)
            if not allocation["bytes"] == planned <= budget.bytes:
                raise RuntimeError(f"size model: {allocation['bytes']} bytes planned, {planned} in the file, "
                                   f"budget {budget.bytes}")
            timings["sensitivity"] = time.perf_counter() - t_s
        if method.needs_calibration:
            engine = LayerwiseEngine(
                cfg, evaluate.CheckpointSource(ckpt), tokens, {p.source: p.type for p in plan}, method,
                device=device, work_dir=out / f".{artifact.stem}.resume", resume=opts.resume,
                fingerprint=fingerprint(res.path.resolve(), tokens.tobytes(), method.name, scheme_name,
                                        sorted((p.source, p.type.name) for p in plan)))
        t1 = time.perf_counter()
        total = sum(p.nbytes for p in plan)
        errors = ErrorTally()
        with _progress(opts, total=total, unit="B", unit_scale=True, desc=f"{method.name} {scheme_name}") as bar:
            try:
                write_gguf(tmp, cfg, vocab, plan, lambda p: quantized_chunks(ckpt, p, engine, opts.threads, errors),
                           **meta, on_tensor=lambda p: bar.set_postfix_str(p.name, refresh=False),
                           on_bytes=bar.update)
            except OSError as e:
                if not is_write_error(e):
                    raise
                raise write_failed(artifact, e, out) from None
        timings["quantize_export"] = time.perf_counter() - t1
        if budget is not None and not tmp.stat().st_size == allocation["bytes"] <= budget.bytes:
            raise RuntimeError(f"wrote {tmp.stat().st_size} bytes; planned {allocation['bytes']} within the "
                               f"budget of {budget.bytes}")  # the size model is exact: a bug if not
        # verify, on the bytes just written
        metrics: dict = {}
        if opts.verify:
            t2 = time.perf_counter()
            metrics = verify(opts, cfg, ckpt, res.path, tmp, eval_text or "")
            timings["verify"] = time.perf_counter() - t2
        gate_entry = quality_gate.judge(metrics, tmp.stat().st_size, n_params) if quality_gate else None
        os.replace(tmp, artifact)
        if engine is not None:
            engine.finish()
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
        "model": model_info(res, cfg, n_params),
        "target": {"format": "gguf", "scheme": scheme_name, "pure": sch.pure, "method": method.name,
                   "file_type": int(sch.file_type), **({"base_scheme": sch.name} if budget else {})},
        "calibration": calib_info,
        "artifact": {"path": artifact.name, "bytes": size, "sha256": report.sha256_file(artifact),
                     "bits_per_weight": 8.0 * size / n_params},
        "tensor_types": types,
        "tensors": [{"name": p.name, "type": p.type.name, "shape": list(p.shape), "bytes": p.nbytes,
                     "rel_error": errors.rel_error(p.name)} for p in plan],
        **({"allocation": allocation} if allocation is not None else {}),
        "metrics": metrics,
        **({"gate": gate_entry} if gate_entry is not None else {}),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": report.versions(),
    }
    report.write_report(out / "report.json", rep)
    if pkg is not None:
        # the GGUF and its report stand on their own; the package stage adds to them or leaves no trace
        packaging.finish(pkg, rep, out / "report.json")
    rep["artifact"]["full_path"] = str(artifact)
    return rep


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


def budget_sizes(opts: Options, cfg: ModelConfig, vocab: Vocab, plan: list[PlannedTensor], sch: Scheme, meta: dict,
                 n_params: int, preset_sized: bool = False) -> tuple[mix.Budget | None, mix.SizeModel | None]:
    """The size budget (None without --max-size/--target-bpw, unless ``preset_sized``: the base scheme's own
    size) and the file's size model around ``plan`` (the base scheme's types; ``n_params`` weights in all).
    A budget no choice of candidates can meet is an error here, before any work."""
    budget = mix.parse_budget(opts.max_size, opts.target_bpw, n_params)
    if budget is None and not preset_sized:
        return None, None
    if budget is not None and not sch.quantized:
        raise UsageError(f"{budget.request}: the base scheme {sch.name} is not quantized; use --bits or a "
                         "quantized --quant (its types are kept for the embeddings)")
    sizes = mix.size_model(plan, cfg, header_bytes(cfg, vocab, plan, **meta))
    if budget is None:  # the base mix's own bytes: one of the allocations, so always within reach
        return mix.Budget(mix.base_bytes(sizes, plan), f"--bits 4 (the size of {sch.name})"), sizes
    mix.check_budget(budget, sizes, n_params)
    return budget, sizes


def budget_plan(opts: Options, cfg: ModelConfig, ckpt: Checkpoint, plan: list[PlannedTensor],
                sizes: mix.SizeModel, budget: mix.Budget, tokens: np.ndarray, method: quantizers.Method,
                device: str) -> tuple[list[PlannedTensor], dict]:
    """The plan with each tunable tensor's type chosen by sensitivity to fit ``budget``, and report.json's
    ``allocation`` section. The proxy quantizer is RTN, imatrix-weighted for the calibrated methods (GPTQ
    and AWQ land below its error on the decoder linears, about equally across types); a GPTQ run's output
    matrix, which GPTQ rounds too, is predicted at GPTQ's measured error (far below RTN's there)."""
    from calibration.sensitivity import SAMPLES
    with _progress(opts, desc="sensitivity", total=min(SAMPLES, len(tokens)) + len(sizes.options)) as bar:
        predicted, info = mix.analyse(cfg, evaluate.CheckpointSource(ckpt), plan, sizes, tokens,
                                      use_imatrix=method.needs_calibration, gptq_head=method.hessian,
                                      device=device, seed=opts.seed,
                                      threads=opts.threads,
                                      progress=lambda s: (bar.set_postfix_str(s, refresh=False), bar.update()))
    chosen, alloc = mix.choose_mix(plan, sizes, predicted, budget)
    section = mix.report(budget, sizes, plan, alloc, predicted, info)
    _log(opts, f"{budget.request}: {section['bytes']} bytes, predicted KLD {alloc.kld:.5f} (base mix "
               f"{section['base_predicted_kld']:.5f} at {section['base_bytes']} bytes)")
    return chosen, section


# ---- ONNX: integer grids, whole-graph export ------------------------------------------------------

ONNX_PRESET = {4: "INT4_G128", 8: "INT8_G128"}


def choose_int_type(opts: Options) -> IntType:
    """The integer grid of an ONNX / OpenVINO run: ``--quant`` by name, else the ``--bits`` preset."""
    name = opts.quant or ONNX_PRESET[opts.bits or 4]
    try:
        t = parse_type(name)
    except (KeyError, ValueError) as e:
        raise QCompileError(f"--quant {name}: {e.args[0] if isinstance(e, ValueError) else 'not an integer grid'}"
                            " (ONNX takes INT4_G128, INT8_G32_SYM, ...: bits 4|8, group 16..256)") from None
    if not isinstance(t, IntType):
        raise QCompileError(f"--quant {name}: ONNX weights use integer grids (INT4_G128, INT8_G32_SYM, ...), "
                            "not GGUF types")
    if t.per_channel and opts.to == "onnx":
        # MatMulNBits' block_size must be a power of two >= 16 (onnxruntime refuses the session otherwise),
        # and a per-channel block is a whole row: Qwen's rows (896, 4864, ...) are not powers of two
        raise UsageError(f"--quant {t.name}: per-channel grids need --to openvino; onnxruntime's MatMulNBits "
                         "takes power-of-two groups only (INT4_G16..INT4_G256)")
    return t


def _folder_format(to: str, opts_float: bool = False):
    """(main file, runtime name, runner factory, report extras) of a folder target."""
    if to == "onnx":
        from exporters.onnx import ONNX_FILE, Runner
        return ONNX_FILE, "onnxruntime", lambda out, threads: Runner(out / ONNX_FILE, threads), \
            {"opset": "ai.onnx 17 + com.microsoft 1", "activations": "float32" if opts_float else "int8"}
    import openvino
    from exporters.openvino import XML_FILE, Runner
    return XML_FILE, "openvino", lambda out, threads: Runner(out, threads), \
        {"openvino": openvino.__version__,
         "verified_with": "CPU plugin, f32 inference, no dynamic activation quantization, f32 KV cache"}


def compile_folder(opts: Options, quality_gate: QualityGate | None = None) -> dict:
    """resolve -> load -> [calibrate] -> quantize (integer grid) -> export (ONNX graph + MatMulNBits, or the
    OpenVINO IR converted from it) -> verify (PyTorch reference; the runtime vs the dequantized model) -> report."""
    from calibration.capture import LINEARS
    try:
        main_file, runtime, runner, extras = _folder_format(opts.to, opts.float_activations)
    except ImportError as e:
        raise QCompileError(f"--to {opts.to} needs {e.name} (pip install {e.name})") from None
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    target = choose_int_type(opts)  # before resolving: a grid the target cannot hold fails without a download
    res = resolve(opts.model, family=opts.family, offline=opts.offline)
    cfg = read_config(res.path)
    method = choose_method(opts, target.bits < 8)
    ckpt = Checkpoint(res.path, cfg, allow_pickle=opts.allow_pickle)
    for i in range(cfg.num_layers):
        for lin in LINEARS:
            cols = ckpt.entry(f"model.layers.{i}.{lin}.weight").shape[1]
            try:
                target.group_for(cols)
            except ValueError as e:
                raise QCompileError(f"layer {i} {lin}: {e}") from None
    n_params = sum(int(np.prod(ckpt.entry(n).shape)) for n in cfg.expected_tensor_names())
    shapes = cost.Shapes.of(cfg)
    # codes + f16 scales + zero points per group; 8-bit lm_head, plus float32 (ONNX) or 8-bit (OpenVINO) embeddings
    group = target.group or shapes.hidden  # a per-channel grid (group 0) has one scale per row
    est_bytes = int(shapes.layers * shapes.layer_linear * (target.bits / 8 + 2.5 / group)
                    + shapes.vocab * shapes.hidden * (2 if opts.to == "openvino" else 5))
    head = head_type(target)
    rtn_work = {(target, shapes.hidden): shapes.layers * shapes.layer_linear,
                (head, shapes.hidden): shapes.vocab * shapes.hidden * (2 if opts.to == "openvino" else 1)}
    plan_cost = cost_plan(opts, cfg, method, calibrated=method.needs_calibration, budget=False,
                          artifact_bytes=est_bytes, rtn_work=rtn_work,
                          timed=opts.dry_run or long_run(method.needs_calibration, n_params),
                          export_to=opts.to)
    check_plan(opts, plan_cost)
    if opts.dry_run:
        return {"dry_run": plan_cost}
    out = opts.out
    check_output(out, out / main_file, opts.force)
    eval_text = _eval_text(opts) if opts.verify else None
    timings["resolve"] = time.perf_counter() - t0
    names = decoder_linears(cfg)
    source = evaluate.CheckpointSource(ckpt)
    calib_info = None
    t1 = time.perf_counter()
    engine = None
    if method.needs_calibration:
        device = resolve_device(opts.device)
        tokens, calib_info = calibration_tokens(opts, res, cfg, ckpt, device)
        _log(opts, f"calibration: {calib_info}")
        engine = LayerwiseEngine(
            cfg, source, tokens, {n: target for n in names}, method, device=device,
            work_dir=out / f".{opts.to}.resume", resume=opts.resume,
            fingerprint=fingerprint(res.path.resolve(), tokens.tobytes(), method.name, target.name, opts.to))
    errors = ErrorTally()
    # the graph is built only once every linear is quantized: until then they wait on disk, memory-mapped
    with Spill(out / f".{opts.to}.spill") as spill:
        with _progress(opts, total=cfg.num_layers, unit="layer", desc=f"{method.name} {target.name}") as bar:
            tensors = quantize_decoder(cfg, source, target, engine, opts.threads,
                                       on_layer=lambda i: bar.update(1), errors=errors, keep=spill.put)
        if not opts.keep_embeddings_fp:
            tensors["lm_head.weight"] = quantize_head(ckpt, cfg, head_type(target), opts.threads, errors, spill)
            if opts.to == "openvino":
                tensors["model.embed_tokens.weight"] = quantize_embeddings(ckpt, head_type(target), opts.threads,
                                                                           errors, spill)
        timings["quantize"] = time.perf_counter() - t1
        # AWQ folds scales into norms/biases: those go into the float graph before the linears are swapped
        t2 = time.perf_counter()
        linears = {n: q for n, q in tensors.items()
                   if n in names or n in ("lm_head.weight", "model.embed_tokens.weight")}
        folded = {n: q.dequantize().reshape(-1) for n, q in tensors.items() if n not in linears}
        from exporters import EXPORTERS
        kw = {"accuracy_level": 0 if opts.float_activations else 4} if opts.to == "onnx" else {}
        files = EXPORTERS[opts.to](out, res.path, cfg, linears, folded, **kw)
        timings["export"] = time.perf_counter() - t2
        if engine is not None:
            engine.finish()
        metrics: dict = {}
        try:
            if opts.verify:
                t3 = time.perf_counter()
                metrics = verify_folder(opts, cfg, ckpt, res.path, runtime, lambda: runner(out, opts.threads), tensors,
                                        eval_text or "")
                timings["verify"] = time.perf_counter() - t3
            gate_entry = (quality_gate.judge(metrics, sum(f.stat().st_size for f in files), n_params)
                          if quality_gate else None)
        except BaseException:
            for f in files:
                f.unlink(missing_ok=True)
            raise
    timings["total"] = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in files)
    rep = {
        "tool": {"name": "qcompile", "command": opts.argv},
        "model": model_info(res, cfg, n_params),
        "target": {"format": opts.to, "scheme": target.name, "bits": target.bits, "group_size": target.group,
                   "symmetric": target.sym, "method": method.name,
                   "lm_head": ("float32" if opts.to == "onnx" else "float16") if opts.keep_embeddings_fp
                   else head_type(target).name,
                   "embeddings": tensors["model.embed_tokens.weight"].type.name
                   if "model.embed_tokens.weight" in tensors else ("float32" if opts.to == "onnx" else "float16"),
                   **extras},
        "calibration": calib_info,
        "artifact": {"path": main_file, "bytes": size,
                     "files": [{"path": f.name, "bytes": f.stat().st_size, "sha256": report.sha256_file(f)}
                               for f in files],
                     "bits_per_weight": 8.0 * size / n_params},
        "tensors": [{"name": n, "type": q.type.name, "shape": list(q.shape), "bytes": q.nbytes,
                     "rel_error": errors.rel_error(n)} for n, q in tensors.items()],
        "metrics": metrics,
        **({"gate": gate_entry} if gate_entry is not None else {}),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": report.versions(),
    }
    report.write_report(out / "report.json", rep)
    rep["artifact"]["full_path"] = str(out / main_file)
    return rep


def decoder_linears(cfg: ModelConfig) -> list[str]:
    """HF names of every decoder linear's weight, layer by layer."""
    from calibration.capture import LINEARS
    return [f"model.layers.{i}.{lin}.weight" for i in range(cfg.num_layers) for lin in LINEARS]


def quantize_decoder(cfg: ModelConfig, source: evaluate.WeightSource, target: IntType, engine=None,
                     threads: int | None = None, on_layer=lambda i: None,
                     errors: ErrorTally | None = None,
                     keep: Callable[[QuantizedTensor], QuantizedTensor] = lambda q: q) -> dict[str, QuantizedTensor]:
    """Every decoder linear on ``target``: from the calibration engine (with any norms/biases it folded
    scales into) or, without one, by RTN straight from ``source``. ``errors`` gets each tensor's
    reconstruction error; ``keep`` decides where each finished tensor waits (default: in memory;
    :class:`qcompile.spill.Spill` ``.put``: on disk, memory-mapped)."""
    from calibration.capture import LINEARS
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
            for lin in LINEARS:
                n = f"model.layers.{i}.{lin}.weight"
                w = source.full(n)
                q = rtn.quantize(n, w, target, threads=threads)
                if errors is not None:
                    errors.add(n, w, q)
                tensors[n] = keep(q)
        on_layer(i)
    return tensors


def head_type(target: IntType) -> IntType:
    """The output matrix's grid: 8-bit (llama.cpp keeps it at Q6_K/Q8_0 too: it is the most sensitive
    matrix), same group size; per-channel asymmetric (``INT8_PC``) for a per-channel target, which is how
    NNCF stores lm_head and the embeddings."""
    return IntType(8, target.group)


def quantize_head(ckpt: Checkpoint, cfg: ModelConfig, t: IntType, threads: int | None,
                  errors: ErrorTally | None = None, spill: Spill | None = None) -> QuantizedTensor:
    """RTN of lm_head (the embeddings when tied), row chunk by row chunk. The float embeddings stay for the
    input lookup (ONNX), so a tied matrix is stored once in float and once in 8 bits, never twice in float."""
    name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return _rtn_rows(ckpt, name, "lm_head.weight", t, threads, errors, spill)


def quantize_embeddings(ckpt: Checkpoint, t: IntType, threads: int | None,
                        errors: ErrorTally | None = None, spill: Spill | None = None) -> QuantizedTensor:
    """RTN of the input embedding table (OpenVINO: 8-bit lookup, as NNCF stores it)."""
    return _rtn_rows(ckpt, "model.embed_tokens.weight", "model.embed_tokens.weight", t, threads, errors, spill)


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


def _eval_text(opts: Options) -> str:
    from qcompile.tiny import builtin_text
    if not opts.eval_text:
        return builtin_text()
    try:
        return opts.eval_text.read_text(encoding="utf-8")
    except OSError as e:
        raise QCompileError(f"--eval-text {opts.eval_text}: {e.strerror}") from None


def _reference_check(opts: Options, cfg: ModelConfig, ckpt: Checkpoint, model_dir: Path,
                     quant: evaluate.WeightSource, text: str) -> tuple[evaluate.ReferenceMetrics, np.ndarray, np.ndarray]:
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
        ref, q_logits = evaluate.reference_eval(cfg, evaluate.CheckpointSource(ckpt), quant, windows,
                                                keep_logits=keep, progress=lambda s: bar.update(1), score=score)
    return ref, q_logits, windows[0, :keep]


def verify_folder(opts: Options, cfg: ModelConfig, ckpt: Checkpoint, model_dir: Path, runtime: str, runner,
                  tensors: dict[str, QuantizedTensor], text: str) -> dict:
    """Reference-path metrics (fp vs dequantized, PyTorch) and the runtime's logits (``runner().logits``)
    vs the dequantized model."""
    quant = evaluate.QuantizedSource(evaluate.CheckpointSource(ckpt), tensors)
    ref, q_logits, tokens = _reference_check(opts, cfg, ckpt, model_dir, quant, text)
    try:
        got = runner().logits(tokens)
    except Exception as e:  # onnxruntime and openvino raise their own exception types
        raise QCompileError(f"verification failed: {runtime} could not run the model ({e})") from None
    return {"reference": ref.as_dict(), "artifact": evaluate.compare_logits(runtime, got, q_logits).as_dict()}


def verify(opts: Options, cfg: ModelConfig, ckpt: Checkpoint, model_dir: Path, gguf_path: Path,
           text: str) -> dict:
    """Reference-path metrics (PyTorch) and, when llama-cpp-python is installed, artifact-path metrics."""
    ref, q_logits, tokens = _reference_check(opts, cfg, ckpt, model_dir, evaluate.GGUFSource(gguf_path, cfg), text)
    out: dict = {"reference": ref.as_dict()}
    if llama_worker.available():
        try:
            got = llama_worker.logits(gguf_path, tokens.tolist(), opts.threads)
        except RuntimeError as e:
            raise QCompileError(f"verification failed: llama.cpp could not run the GGUF ({e})") from None
        out["artifact"] = evaluate.compare_logits("llama.cpp", got, q_logits).as_dict()
    else:
        out["artifact"] = None
        _log(opts, "note: llama-cpp-python is not installed; skipped the in-runtime check")
    return out
