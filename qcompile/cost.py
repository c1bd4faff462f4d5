"""What a compile will cost, predicted from its plan before any work: peak memory and wall time per stage.

Why: a 7B compile on a laptop takes long and uses much of the machine's memory. The user should know
both before it starts, and a run that cannot fit should stop in its first second with the option that
makes it fit, not be killed by the kernel an hour in.

**Memory** is written down from what each stage holds at its peak: the model's shapes times bytes per
value (one decoder layer's weights in the precisions the stage keeps, the calibration activations,
Hessians, the solver's working matrices, ...), plus the process's baseline. These are the structures of
the code in ``calibration/`` and ``qcompile/``; a change there that changes what is held changes the
formula here, and ``tests/test_cost.py`` compares the two on real runs. Memory-mapped files (the
checkpoint's shards, the GGUF that llama.cpp samples from or verifies) are reported apart: they are page
cache, shared and reclaimable, not memory the run allocates.

**Time** is each stage's work (values quantized, multiply-adds, decode steps) divided by this machine's
throughput for that kind of work. Throughputs come from short probes of the same kernels (about a second
in all, on first use, scaled to ``--threads``); the few constants that no probe measures (Python
overhead per GPTQ column, per sampled token) were fitted on ``benchmarks/scale_bench.py`` runs.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import numpy as np

from qcompile.model import ModelConfig

MB = 1 << 20
GB = 1 << 30

# Process baselines (anonymous RSS), measured: Python + NumPy + gguf + ggml's quantizers, tokenizer and
# vocabulary loaded (the RTN path never imports torch); + torch and transformers' Qwen modules.
BASE = 190 * MB
BASE_TORCH = 430 * MB
CHUNK_BUFFERS = 3 * 16 * MB          # checkpoint.CHUNK_BYTES: a chunk, its prefetch and its quantized copy
LLAMA_CHILD = 120 * MB               # the llama.cpp child process (Python, llama-cpp-python) before buffers
ENGINE_BATCH_TOKENS = 2048           # tokens per forward batch in the layer engine (capture.BATCH_TOKENS)
FORWARD_TOKENS = 2048                # tokens per forward batch of the sensitivity analysis
# GPTQ factors Hessians up to this many columns in float64 (quantizers/gptq.py), larger ones in float32
GPTQ_F64_COLS = 12288
# fitted on benchmarks/scale_bench.py (2-core Xeon with AMX, torch 2.13): seconds per GPTQ column visited
# in the Python sweep (per row of weights: the sweep's vector work), and per sampled token (NumPy top-p)
GPTQ_COLUMN_S, GPTQ_COLUMN_ROW_S = 60e-6, 4e-9
SAMPLE_TOKEN_S = 2.5e-3
# fitted on benchmarks/scale_bench.py's stage times (report.json timings_s; 0.5B, 1.5B and the 7B cut to 2
# and 4 layers): the share of the probes' throughput a stage's products reach. llama.cpp's AVX2 build
# decoding 32 sequences at once, of torch's float32 GEMM probe; the Fisher's products (forward, forward
# again, backward one window at a time under autocast), of the bfloat16 probe (above 1: the probe's
# 1024-cube product is not AMX's best case), beside a per-window cost in memory traffic; the engine's bf16
# layer passes (2048-token batches), of the bfloat16 probe. Fitted per 7B layer (the 4-layer run less the
# 2-layer one, at 73d26c5): self-calibration 45 s, the analysis 21 s (8 x 256 tokens, imatrix-weighted
# predictions) and 17 s (8 x 512, --max-size with RTN), the imatrix engine 28 s.
LLAMA_SHARE = 0.65
FISHER_SHARE = 2.0
FISHER_WINDOW_BYTES = 30  # per analysed weight and window (its gradient, the square, the sum, the casts)
ENGINE_SHARE = 1.1
# ggml's imatrix-weighted scale search (make_qkx3_quants) against the plain one, per K-quant value: fitted
# on 1536 x 8960 tensors (2 cores): Q4_K 0.97 s vs 0.59 s, Q5_K 1.07 vs 0.59, Q6_K 0.42 vs 0.27
IMATRIX_SEARCH = 1.7


@dataclass(frozen=True)
class Shapes:
    """The sizes every formula needs, from config.json."""
    layers: int
    hidden: int
    inter: int
    q: int          # heads * head_dim
    kv: int         # kv heads * head_dim
    vocab: int
    tied: bool
    # mixture of experts (0 for dense): routed experts, experts per token, an expert's width, the shared one's
    experts: int = 0
    used: int = 0
    expert_inter: int = 0
    shared_inter: int = 0

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Shapes":
        # an MoE layer holds all its experts (and the shared one) when it is built: their total width is the
        # layer's MLP for memory (``inter``); a token runs through its top-k only (``active_inter``)
        moe = cfg.arch.moe
        inter = (cfg.num_experts * cfg.expert_intermediate_size + cfg.shared_expert_intermediate_size
                 if moe else cfg.intermediate_size)
        return cls(cfg.num_layers, cfg.hidden_size, inter, cfg.num_heads * cfg.head_dim,
                   cfg.num_kv_heads * cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings,
                   cfg.num_experts, cfg.num_experts_used, cfg.expert_intermediate_size,
                   cfg.shared_expert_intermediate_size)

    @property
    def active_inter(self) -> int:
        """The MLP width one token runs through (an MoE's top-k experts and its shared expert)."""
        return self.used * self.expert_inter + self.shared_inter if self.experts else self.inter

    @property
    def layer_linear(self) -> int:
        """Weights of one decoder layer's linears."""
        h = self.hidden
        return h * self.q + 2 * h * self.kv + self.q * h + 3 * h * self.inter

    @property
    def active_linear(self) -> int:
        """Weights of one decoder layer's linears that a token runs through."""
        h = self.hidden
        return h * self.q + 2 * h * self.kv + self.q * h + 3 * h * self.active_inter

    @property
    def decoder_linear(self) -> int:
        """Weights of all decoder layers' linears."""
        return self.layers * self.layer_linear

    @property
    def params(self) -> int:
        return self.decoder_linear + self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def stat_inputs(self) -> list[int]:
        """Input widths of the linear groups that share statistics: q/k/v, o, gate/up, down."""
        if self.experts:  # one expert's statistics at a time (and the shared expert's)
            return [self.hidden, self.q, self.hidden, self.expert_inter] + (
                [self.hidden, self.shared_inter] if self.shared_inter else [])
        return [self.hidden, self.q, self.hidden, self.inter]

    @property
    def groups(self) -> list[tuple[int, int]]:
        """(rows, cols) of each GPTQ solve: q+k+v stacked, o, gate+up stacked, down."""
        h = self.hidden
        if self.experts:  # expert by expert: gate+up of each, then its down
            e, i, sh = self.experts, self.expert_inter, self.shared_inter
            return [(self.q + 2 * self.kv, h), (h, self.q), (2 * e * i, h), (h * e, i)] + (
                [(2 * sh, h), (h, sh)] if sh else [])
        return [(self.q + 2 * self.kv, h), (h, self.q), (2 * self.inter, h), (h, self.inter)]


@dataclass
class Stage:
    name: str
    anon: int           # peak anonymous memory of the process tree during the stage, bytes
    mapped: int         # memory-mapped file bytes touched during the stage (page cache)
    seconds: float
    lower: str = ""     # the option that lowers this stage's memory


@dataclass
class Plan:
    stages: list[Stage]

    @property
    def peak(self) -> Stage:
        return max(self.stages, key=lambda s: s.anon)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def summary(self) -> str:
        p = self.peak
        return (f"plan: peak memory ~{p.anon / GB:.1f} GB ({p.name}"
                + (f"; + {p.mapped / GB:.1f} GB of mapped files" if p.mapped else "")
                + f"), time ~{_duration(self.seconds)}")

    def table(self) -> str:
        rows = [f"{'stage':<22} {'memory':>9} {'mapped':>9} {'time':>9}"]
        for s in self.stages:
            rows.append(f"{s.name:<22} {s.anon / GB:>7.2f}GB {s.mapped / GB:>7.2f}GB {_duration(s.seconds):>9}")
        # the total also in seconds, for scripts that compare it with a measurement (benchmarks/scale_bench.py)
        rows.append(f"{'peak / total':<22} {self.peak.anon / GB:>7.2f}GB {'':>9} {_duration(self.seconds):>9}"
                    f"  ({self.seconds:.0f} s)")
        return "\n".join(rows)


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


# ---- throughput probes --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rates:
    """This machine's throughput, per second: values quantized by ggml (per type family), values read
    from a bf16 checkpoint, float32 / bfloat16 / float64 multiply-adds (torch), bytes copied."""
    rtn: float
    read: float
    f32: float
    bf16: float
    f64: float
    copy: float

    @property
    def mm(self) -> float:
        """Multiply-adds per second of the calibration passes: bfloat16 where this CPU makes it fast, else
        float32 (:func:`quantizers.linalg.bf16_is_fast`; an AVX2-only CPU emulates bfloat16 at ~1/80 the rate)."""
        from quantizers import linalg
        return self.bf16 if linalg.bf16_is_fast("cpu") else self.f32


@functools.lru_cache(maxsize=64)
def rtn_rate(t, cols: int, threads: int | None = None) -> float:
    """Values per second that RTN onto ``t`` (a GGUF type or an integer grid) reaches on rows of ``cols``."""
    from quantizers import rtn
    w = np.random.default_rng(0).standard_normal((max(1, (1 << 20) // cols), cols), dtype=np.float32)
    return w.size / _best(lambda: rtn.quantize("probe", w, t, threads=threads), repeats=2)


def rtn_seconds(work: dict[tuple, int], threads: int | None = None) -> float:
    """Seconds of RTN for ``work``: (type, row length) -> values, each type probed on its own (ggml's
    types differ by 10x: Q8_0 or Q5_0 are a scale per block, Q4_K searches its sub-block scales)."""
    return sum(n / rtn_rate(t, cols, threads) for (t, cols), n in work.items())


def _best(fn, repeats: int = 3) -> float:
    fn()  # warm up (thread pools, first-touch pages)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@functools.lru_cache(maxsize=8)
def rates(threads: int | None = None, flops: bool = True) -> Rates:
    """Probe the kernels the stages spend their time in (about a second). ``flops=False``: only what a
    plan without matrix products needs (RTN, reads, copies); torch is not imported for it, which keeps
    an RTN run of a 1B+ model at its ~0.2 GB (torch alone is ~0.25 GB)."""
    from gguf import GGMLQuantizationType as T

    from quantizers import rtn
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 4096), dtype=np.float32)
    t_rtn = _best(lambda: rtn.quantize("probe", w, T.Q4_K, threads=threads))
    raw = (w.view(np.uint32) >> 16).astype(np.uint16)
    t_read = _best(lambda: (raw.astype(np.uint32) << 16).view(np.float32))
    big = np.ones(32 * MB // 4, np.float32)
    t_copy = _best(lambda: big.copy())
    out = {"f32": float("inf"), "bf16": float("inf"), "f64": float("inf")}
    if flops:
        import torch
        if threads:
            torch.set_num_threads(threads)
        from quantizers import linalg
        n = 1024
        for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16), ("f64", torch.float64)):
            if name == "bf16" and not linalg.bf16_is_fast("cpu"):
                continue  # not used (Rates.mm), and an emulated bfloat16 product of this size takes seconds
            a = torch.randn(n, n, dtype=torch.float32).to(dt)
            out[name] = n ** 3 / _best(lambda: a @ a)
    return Rates(w.size / t_rtn, w.size / t_read, out["f32"], out["bf16"], out["f64"], big.nbytes / t_copy)


# ---- the stages ------------------------------------------------------------------------------------

def rtn_stream(s: Shapes, r: Rates, rtn_s: float, name: str = "quantize + write") -> Stage:
    """RTN straight from the checkpoint into the file, one row-chunk at a time (``rtn_s``: the quantizers'
    seconds, :func:`rtn_seconds`)."""
    return Stage(name, BASE + CHUNK_BUFFERS, 0, rtn_s + s.params / r.read)


def self_generation(s: Shapes, r: Rates, n: int, seqlen: int, q8_s: float) -> list[Stage]:
    """Q8_0 copy (streamed like RTN) then llama.cpp sampling: KV cache (f16) of every sequence, logits
    of one token per sequence, the mapped Q8_0 file; decode steps read the whole file each."""
    q8 = int(s.params * 34 / 32)
    kv = s.layers * 2 * s.kv * 2 * n * (seqlen + 256)
    logits = n * s.vocab * 4 * 2
    child = LLAMA_CHILD + kv + logits + s.vocab * 8
    steps = seqlen - 24  # prompts are ~24 tokens
    products = s.decoder_linear + s.vocab * s.hidden  # the embedding is a lookup, not a product
    per_step = max(q8 / r.copy, 2 * products * n / (LLAMA_SHARE * r.f32))
    return [Stage("self-calibration copy", BASE_TORCH + CHUNK_BUFFERS, 0, q8_s + s.params / r.read),
            Stage("self-calibration", BASE_TORCH + child, q8, steps * per_step + n * seqlen * SAMPLE_TOKEN_S,
                  "--calib FILE (or fewer --calib-samples)")]


def engine(s: Shapes, r: Rates, n: int, seqlen: int, hessian: bool, awq: bool) -> Stage:
    """The layer engine (GPTQ / AWQ / imatrix): per layer, the module (bf16, or f32 where bf16 is slow), the
    calibration activations (the f32 residual stream, rewritten in place), the group statistics (Hessians for
    GPTQ), the float32 weights of the group being quantized and GPTQ's working set for the widest group."""
    from calibration.capture import SPILL_RESIDUAL_BYTES
    tokens = n * seqlen
    # the f32 residual stream, updated in place; past SPILL_RESIDUAL_BYTES it is a file mapping whose pages
    # are dropped batch by batch (page cache, not the run's memory)
    hidden = tokens * s.hidden * 4 if tokens * s.hidden * 4 <= SPILL_RESIDUAL_BYTES else 0
    from quantizers import linalg
    module = s.layer_linear * (2 if linalg.bf16_is_fast("cpu") else 4)
    act = max(1, ENGINE_BATCH_TOKENS // seqlen) * seqlen * (4 * s.active_inter + 4 * s.hidden) * 4
    if s.experts:  # the MoE block's inputs of all windows, kept to calibrate the experts one by one
        act += tokens * (s.hidden + s.used) * 4
    hess = sum(c * c for c in s.stat_inputs) * 4 if hessian else 0
    weights = s.layer_linear * 4 if awq else max(rws * c for rws, c in s.groups[:2]) * 4 * 2 if s.experts else \
        max(rws * c for rws, c in s.groups) * 4 * 2
    # GPTQ factors a Hessian in float64 (two matrices at most) up to GPTQ_F64_COLS columns, a wider one in
    # float32 in place (quantizers/gptq.py): no copy of 7B's 1.4 GB down_proj Hessian
    solve = max((2 * c * c * 8 for c in s.stat_inputs if c <= GPTQ_F64_COLS), default=0) if hessian else 0
    samples = 2 * min(tokens, 2048) * (2 * s.hidden + s.inter) * 4 if awq else 0
    # the forward pass (module, a batch's activations) and the solves (a group's float32 weights, the
    # factorisation) do not overlap: the module's linears are let go while the quantizer runs
    anon = BASE_TORCH + hidden + hess + samples + max(module + act, weights + solve)
    flops = 2 * 2 * s.active_linear * tokens         # the layer runs twice (statistics, then quantized)
    t = flops / (ENGINE_SHARE * r.mm)
    if hessian:
        t += sum(tokens * c * c for c in s.stat_inputs) / r.mm                        # X^T X
        t += sum(c ** 3 / (r.f64 if c <= GPTQ_F64_COLS else r.f32) for c in s.stat_inputs)  # factorisations
        t += sum(rws * c * c for rws, c in s.groups) / r.f32                          # lazy updates
        t += sum(c * (GPTQ_COLUMN_S + rws * GPTQ_COLUMN_ROW_S) for rws, c in s.groups)  # column sweep
    # GPTQ rounds the layer itself; the other methods through ggml's imatrix-weighted search
    t += (1.0 if hessian else IMATRIX_SEARCH) * s.layer_linear / r.rtn + s.layer_linear / r.read
    # the output matrix against the final-normed stream (LayerwiseEngine.head_stats): GPTQ solves its vocab
    # rows in row chunks with one [hidden, hidden] Hessian, the imatrix methods search it weighted
    head, head_t = 0, 0.0  # a tied model's output is the embedding table, rounded by RTN
    if not s.tied:
        head = s.vocab * s.hidden
        head_t = IMATRIX_SEARCH * head / r.rtn
        if hessian:
            head_t = (tokens * s.hidden ** 2 / r.mm + head * s.hidden / r.f32
                      + s.hidden * (GPTQ_COLUMN_S + s.vocab * GPTQ_COLUMN_ROW_S))
    return Stage("calibrated quantization", anon, 0,
                 s.layers * t + head_t + (s.params - s.decoder_linear - head) / r.rtn,
                 "--calib-samples / --calib-seqlen")


def sensitivity(s: Shapes, r: Rates, n: int, seqlen: int, predict_s: float = 0.0) -> Stage:
    """--max-size: layer-by-layer Fisher (weights, gradients and Fisher of one layer in f32, the gradient
    of every window's hidden states, one window's activations), then the predictions (``predict_s``: the
    quantizers' seconds, :func:`prediction_work`), each reading the tensor and its Fisher."""
    tokens = n * seqlen
    layer = 3 * s.layer_linear * 4
    grads = tokens * s.hidden * 4
    act = seqlen * (6 * s.inter + 8 * s.hidden) * 4
    head = 3 * tokens * s.hidden * 4 + 3 * seqlen * s.vocab * 4  # one window's logits, softmax, gradient
    anon = BASE_TORCH + max(layer + grads + act, s.layer_linear * 4 + 2 * grads + head)
    # decoder layers: forward, forward again with gradients, backward (twice a forward), under bfloat16
    # autocast; the output matrix's four products in bfloat16 (logits for sampling, again for the gradient,
    # the gradient itself and its Fisher)
    t = 4 * 2 * (s.decoder_linear + s.vocab * s.hidden) * tokens / (FISHER_SHARE * r.mm)
    # and per window, whatever its length, every analysed weight's gradient is made, squared and summed
    # (and under autocast cast to bfloat16): memory traffic, not products
    analysed = s.decoder_linear + (0 if s.tied else s.vocab * s.hidden)
    t += n * analysed * FISHER_WINDOW_BYTES / r.copy
    t += predict_s + 3 * s.params / r.read
    return Stage("sensitivity", anon, 0, t, "--calib-samples (the analysis uses at most 8 x 512)")


def prediction_work(rtn_work: dict[tuple, int], imatrix: bool) -> dict[tuple, int]:
    """The RTN the sensitivity analysis runs (``rtn_work``: (type, row length) -> values of the file): the
    reference type on every value, each other candidate on one row in ``ROW_SAMPLE``
    (:func:`calibration.sensitivity.predict_types`), the imatrix searches counted at their cost."""
    from calibration.sensitivity import REFERENCE, ROW_SAMPLE
    from quantizers.schemes import candidate_types
    work: dict[tuple, int] = {}
    for (_, cols), v in rtn_work.items():
        for t in candidate_types(cols):
            share = 1 if t == REFERENCE else (IMATRIX_SEARCH if imatrix else 1) / ROW_SAMPLE
            work[(t, cols)] = work.get((t, cols), 0) + int(v * share)
    return work


def verify(s: Shapes, r: Rates, tokens: int, artifact_bytes: int) -> list[Stage]:
    """Reference path (fp and dequantized model side by side, one layer each, f32), then the runtime."""
    hidden = 2 * 2 * tokens * s.hidden * 4
    layers = 2 * s.layer_linear * 4
    head = 3 * 64 * MB
    t = 2 * 2 * s.params * tokens / r.f32 + s.params / r.read
    return [Stage("verify (PyTorch)", BASE_TORCH + hidden + layers + head, 0, t, "--eval-tokens"),
            Stage("verify (runtime)", BASE_TORCH + LLAMA_CHILD + 128 * s.vocab * 4, artifact_bytes,
                  2 * s.params * 128 / r.f32 + artifact_bytes / r.copy)]


# ONNX / OpenVINO export, fitted on benchmarks/scale_bench.py (the 7B configuration cut to 2 and 4 layers,
# measured at a0ebcbf, less the plan's own quantize + write): seconds per parameter of tracing, binding and
# serialisation, for a decoder layer's (quantized) weights and for the rest (embeddings, head, norms), on
# the fitting machine (2 cores). Not scaled by a probe: the read probe varied 3x between runs of the same
# plan (0.54-1.8 G values/s), which swung these forecasts by 30%. And the export's peak over the torch
# baseline in bytes per value of the vocabulary x hidden matrix. That peak is the tracer's: the weightless
# model's zero-strided head weight is made contiguous for the head's matmul (ONNX: one float32 copy; OpenVINO's TorchScript trace less); the
# quantized tensors wait on disk and the float embeddings stream (qcompile/spill.py, exporters/onnx.py).
EXPORT_S_PER_PARAM = {"onnx": (7.3e-8, 2.75e-8), "openvino": (7.7e-8, 3.6e-8)}  # (layer weight, other)
EXPORT_HEAD_BYTES = {"onnx": 4.0, "openvino": 3.3}


def folder_export(s: Shapes, r: Rates, to: str) -> Stage:
    """ONNX / OpenVINO: the float graph traced without weights, then the quantized tensors (from the spill)
    and the float ones (streamed from the checkpoint) bound in and written."""
    layer_s, other_s = EXPORT_S_PER_PARAM[to]
    return Stage("export", BASE_TORCH + int(EXPORT_HEAD_BYTES[to] * s.vocab * s.hidden), 0,
                 s.decoder_linear * layer_s + (s.params - s.decoder_linear) * other_s)


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, or the cgroup's limit less its usage if lower."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                avail = min(avail or 1 << 62, int(limit) - int(f.read()))
    except OSError:
        pass
    return avail


def threads_default(threads: int | None) -> int:
    return threads or os.cpu_count() or 1
