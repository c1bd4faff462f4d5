"""How much quantizing each tensor costs: its predicted KL divergence, per candidate GGUF type.

Second order. The full-precision model's predictive distribution ``p`` is a minimum of ``q -> KL(p || q)``,
so for a small change ``δ`` of the weights ``KL(p || p_δ) ≈ ½ δᵀ F δ`` with ``F`` the Fisher information
of ``p``. Rounding errors of different weights are (nearly) independent and zero-mean, so the cross
terms of ``F`` average out and its diagonal suffices; per tensor ``t`` and type ``τ``:

    ΔKLD_t(τ) ≈ ½ Σ_i F_ii (W_i − Q_τ(W)_i)²    (mean KLD per token, nats)

with ``Q_τ`` our real quantizer (ggml's RTN, imatrix-weighted when the method calibrates). The sum over
tensors predicts the KLD of a whole mix; :mod:`quantizers.allocate` spends a byte budget with it.

Why a Fisher and not measuring each tensor: measuring needs one forward pass per (tensor, type), ~500
passes for a 24-layer model; the diagonal Fisher costs one forward and one backward pass per calibration
sequence, whatever the number of candidates.

**Which Fisher.** The labels are sampled from the model's own distribution (``y ~ p``) rather than taken
from the text ("empirical Fisher"): ``E_{y~p}[∇log p(y)²]`` is the curvature of the KLD, while the
empirical Fisher is another matrix (small wherever the model predicts the text confidently, whatever a
weight change would do to the rest of the distribution). Sampling also lets one backward pass serve a
whole sequence: each sampled position's gradient has mean zero and the positions are sampled
independently (the inputs are the real text), so the square of their summed gradient is an unbiased
estimate of the sum of their squares. One sample per position is noisy per weight, but a tensor's
prediction sums over its ~10^6 weights.

**Cost.** Memory is about one decoder layer, whatever the model size. The windows go through the decoder
one layer at a time without gradients (each layer's input saved to a temporary ``.npy`` file under
``$TMPDIR``); the head samples the labels and gives the gradient of the last hidden states; then the
layers are walked backwards, each rebuilt, re-run from its saved input and back-propagated one sequence at
a time, and as soon as a layer's Fisher is complete it becomes predicted KLDs and is dropped. Held at once:
one float32 layer with its gradients and Fisher (3 x 4 bytes per parameter of one layer: ~2.8 GB at 7B),
the hidden states and their gradients for all windows (``[n, T, hidden]`` float32: 59 MB each for 8 x 512
tokens at 7B), one window's logits for sampling (311 MB at 7B) and chunks of the output matrix of
:data:`HEAD_CHUNK_BYTES`. Disk: one ``[n, T, hidden]`` file per layer (3.3 GB at 7B). Compute: every layer
runs forward twice (the saved input is re-run with gradients instead of keeping the graph) and backward
once per sequence; the output matrix is read once per window (sampling) and once more (gradients).
"""
from __future__ import annotations

import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from qcompile.model import HEAD_CHUNK_BYTES, ModelConfig, StreamedDecoder, WeightSource
from quantizers import linalg, rtn
from quantizers.grids import Target

if TYPE_CHECKING:
    import torch

SAMPLES, SEQLEN = 8, 512    # calibration sequences (and their length at most) for the Fisher
CHUNK_VALUES = 1 << 24      # weights quantized at a time when predicting (bounds the temporary copies)
BF16: bool | None = None    # bfloat16 autocast for the decoder layers (see _autocast); None: where it is fast
FORWARD_TOKENS = 2048       # tokens per batch in the forward pass (bounds a layer's activations)
ROW_SAMPLE = 8              # the candidate types are predicted on one row in 8 (see predict_types)
MIN_SAMPLED_ROWS = 64       # a tensor with fewer than ROW_SAMPLE x this rows is predicted on every row
REFERENCE = T.Q8_0          # the type predicted on every row, whose ratios carry the others (predict_types)


@dataclass
class Sensitivity:
    """The predicted KLD per analysed tensor (HF name) and candidate type; each decoder linear's mean
    squared input (llama.cpp's imatrix) seen on the way, and the output matrix's when it was predicted
    imatrix-weighted; and how much text the Fisher saw."""
    predicted: dict[str, dict[Target, float]]
    sq_mean: dict[str, np.ndarray]
    sequences: int
    tokens: int


def sensitivity(cfg: ModelConfig, source: WeightSource, tokens: np.ndarray, types: dict[str, list[Target]], *,
                use_imatrix: bool, gptq_head: bool = False, device: str = "cpu", seed: int = 0,
                threads: int | None = None, progress: Callable[[str], None] = lambda s: None) -> Sensitivity:
    """Predicted KLD of quantizing each tensor of ``types`` (decoder linears and/or ``lm_head.weight``, HF
    names) to each of its candidate types, from the diagonal Fisher over the calibration windows ``tokens``
    [n, T] (float32 on ``device``), one decoder layer in memory at a time.

    ``use_imatrix``: quantize the decoder linears with their input statistics, as the calibrated methods
    do (the output matrix's with the final-normed states' statistics, as the pipeline rounds it). With
    ``gptq_head`` the output matrix is rounded by GPTQ (see :func:`gptq_head_ratios`). ``progress`` is called
    once per window (its labels sampled) and once per tensor (predicted).
    """
    head_name = cfg.head_name  # the output matrix, when it is analysed
    dec = StreamedDecoder(cfg)
    by_layer = _by_layer(cfg, list(types))
    lowest = min(by_layer, default=cfg.num_layers)  # no gradient is needed below the lowest analysed layer
    n_tok = int(tokens.size)
    head = {t: 0.0 for t in types[head_name]} if head_name in types else None

    head_importance = None

    def predict_head(w: "torch.Tensor", fisher_sum: "torch.Tensor") -> None:
        # ggml quantizes each row on its own: the output matrix is predicted chunk by chunk
        w_np, f_np = w.cpu().numpy(), (fisher_sum / n_tok).cpu().numpy()
        for t, v in predict_types(head_name, w_np, f_np, list(head), head_importance, threads).items():
            head[t] += v

    predicted: dict[str, dict[Target, float]] = {}
    with tempfile.TemporaryDirectory(prefix="qcompile-fisher-") as tmp:
        saved, hidden, sq_mean = _forward(dec, source, tokens, lowest, Path(tmp), device)
        ratios = {}
        if head is not None and (gptq_head or use_imatrix):  # the head's input, as the pipeline rounds it
            normed = dec.final_norm(source, hidden).reshape(-1, hidden.shape[-1])
            if gptq_head:
                ratios = gptq_head_ratios(dec, source, normed, list(head))
            else:
                head_importance = sq_mean[head_name] = normed.square().mean(0).cpu().numpy().astype(np.float32)
            del normed
        grad = _head_backward(dec, source, hidden, seed, None if head is None else predict_head, progress)
        del hidden
        if head is not None:
            predicted[head_name] = {t: v * ratios.get(t, 1.0) for t, v in head.items()}
            progress(f"predicting {head_name}")
        for i in reversed(range(lowest, cfg.num_layers)):
            # the layer's Fisher lives only inside this call: never two layers' at once
            fisher = _backward_layer(dec, source, i, saved.pop(i), grad, by_layer.get(i, []), device,
                                     pass_down=i > lowest)
            predicted.update(_predict_layer(fisher, types, sq_mean if use_imatrix else {}, n_tok, threads,
                                            progress))
            del fisher
    return Sensitivity({n: predicted[n] for n in types}, sq_mean, int(tokens.shape[0]), n_tok)


HEAD_RATIO_ROWS = 1024  # output-matrix rows on which GPTQ's error ratio to RTN is measured


def gptq_head_ratios(dec: StreamedDecoder, source: WeightSource, normed: "torch.Tensor", types: list[Target]
                     ) -> dict[Target, float]:
    """Per candidate type, the output error of GPTQ over that of RTN, ``tr(E H Eᵀ)`` with ``H`` the
    Gram matrix of the ``normed`` states ([tokens, hidden]: the final norm's output, the head's input), on
    :data:`HEAD_RATIO_ROWS` seeded rows of the output
    matrix. The Fisher predicts RTN's error; the pipeline rounds a GPTQ run's head by GPTQ (about 0.2x RTN's
    output error on the real 0.5B), so its prediction is scaled by this ratio (rows are independent given
    ``H``, and the ratio varies little between them: a sample pins it down), and the allocator does not
    spend on the head what GPTQ already saves there. Types GPTQ has no grid for keep ratio 1."""
    head_name = dec.cfg.head_name
    from quantizers.gptq import gptq
    from quantizers.grids import GRIDS
    x = normed.double()
    gram = (x.T @ x / x.shape[0]).float().cpu().numpy()
    vocab = source.shape(dec.head_name)[0]
    rows = np.sort(np.random.default_rng(zlib.crc32(head_name.encode())).choice(vocab, min(vocab, HEAD_RATIO_ROWS),
                                                                           replace=False))
    w = np.ascontiguousarray(source.take(dec.head_name, rows), dtype=np.float32)
    out_err = lambda q: float(np.einsum("ij,jk,ik->", q.dequantize() - w, gram, q.dequantize() - w,
                                        optimize=True))
    ratios = {}
    for t in types:
        if t in GRIDS and w.shape[1] % GRIDS[t].block == 0:
            base = out_err(rtn.quantize(head_name, w, t))
            ratios[t] = out_err(gptq(head_name, w, gram.copy(), t)) / base if base > 0 else 1.0
    return ratios


def _bf16(device: str) -> bool:
    """:data:`BF16` if set, else whether bfloat16 products are fast on ``device`` (linalg.bf16_is_fast: on
    an AVX2-only CPU they are an emulation, 80x slower than float32)."""
    return linalg.bf16_is_fast(device) if BF16 is None else BF16


def _autocast(torch, device: str):
    """bfloat16 autocast for the decoder layers' forward and backward passes (weights, Fisher and the
    hidden states between layers stay float32; the output matrix's products: :func:`_mm`).

    Why: the Fisher only ranks tensors and types, and its estimate is noisier than bfloat16's rounding
    (benchmarks/sensitivity_bench.py, real 0.5B at Q4_K_M's size, 2 cores with AMX: 16 windows in float32
    241 s, 8 windows in bfloat16 139 s, 8 of 169 choices different — other windows of text move about as
    many). ``cache_enabled=False``: no bfloat16 copy of a 7B layer's weights is kept beside the float32
    ones (a cast per window is cheap next to the window's matmuls)."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=_bf16(device),
                          cache_enabled=False)


def _mm(torch, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as float32, computed in bfloat16 where :func:`_bf16` says so (the output matrix's products:
    logits, their gradient, the Fisher of its rows; 4 passes over vocab x hidden x tokens, float32 sums kept)."""
    if not _bf16(a.device.type):
        return a @ b
    return (a.to(torch.bfloat16) @ b.to(torch.bfloat16)).float()


def _by_layer(cfg: ModelConfig, names: list[str]) -> dict[int, list[str]]:
    """The analysed decoder linears per layer index (``lm_head.weight`` aside); unknown names are an error."""
    head_name = cfg.head_name
    where = {n: i for i in range(cfg.num_layers)
             for n in cfg.linear_names(i) + (list(cfg.arch.expert_names(i)) if cfg.arch.moe else [])}
    missing = [n for n in names if n != head_name and n not in where]
    if missing:
        raise ValueError(f"no such weights to analyse: {', '.join(sorted(missing))}")
    by_layer: dict[int, list[str]] = {}
    for n in names:
        if n != head_name:
            by_layer.setdefault(where[n], []).append(n)
    return by_layer


def _forward(dec: StreamedDecoder, source: WeightSource, tokens: np.ndarray, save_from: int, tmp: Path,
             device: str) -> tuple[dict[int, Path], "torch.Tensor", dict[str, np.ndarray]]:
    """The windows through the decoder one layer at a time, without gradients.

    Returns the files holding the inputs of layers ``save_from`` and up (float32 [n, T, hidden]: the
    backward pass re-runs each layer from them, too big to keep in RAM for every layer at 7B), the last
    layer's output, and each decoder linear's mean squared input (llama.cpp's imatrix: HF weight name ->
    [in]).
    """
    arch = dec.cfg.arch
    sq_sum: dict[str, "torch.Tensor"] = {}

    def record(name: str):
        def hook(_mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sq_sum[name] = sq_sum.get(name, 0) + x.square().sum(0)
        return hook

    batch = max(1, FORWARD_TOKENS // tokens.shape[1])
    h = dec.embed(source, tokens).to(device)
    saved: dict[int, Path] = {}
    for i in range(dec.cfg.num_layers):
        if i >= save_from:
            saved[i] = tmp / f"layer{i}.npy"
            np.save(saved[i], h.cpu().numpy())
        layer = dec.build_layer(i, source, device)
        for mod in set(arch.linears(i).values()):  # q/k/v share their input, as do gate/up
            layer.get_submodule(mod).register_forward_pre_hook(record(arch.layer_prefix(i) + mod))
        with _autocast(dec.torch, device):
            h = dec.run_layer(layer, h, batch)
        del layer
    n_tok = int(tokens.size)
    sq_mean = {f"{arch.layer_prefix(i)}{lin}.weight": (sq_sum[arch.layer_prefix(i) + mod] / n_tok).cpu().numpy()
               for i in range(dec.cfg.num_layers) for lin, mod in arch.linears(i).items()}
    return saved, h, sq_mean


def _head_rows(n_tok: int, hidden: int) -> int:
    """Vocabulary rows per chunk: neither the chunk of the output matrix nor its [tokens, rows] logits
    exceed :data:`HEAD_CHUNK_BYTES` of float32 (the whole matrix is 2.2 GB at 7B)."""
    return max(1, HEAD_CHUNK_BYTES // (4 * max(n_tok, hidden)))


def _head_chunks(dec: StreamedDecoder, source: WeightSource, rows: int, device):
    """Yield (first vocabulary id, float32 rows of the output matrix on ``device``), ``rows`` at a time."""
    vocab = source.shape(dec.head_name)[0]
    for v0 in range(0, vocab, rows):
        w = np.ascontiguousarray(source.rows(dec.head_name, v0, min(v0 + rows, vocab)), dtype=np.float32)
        yield v0, dec.torch.from_numpy(w).to(device)


def _sample_labels(dec: StreamedDecoder, source: WeightSource, normed: "torch.Tensor", seed: int,
                   progress: Callable[[str], None]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Labels ``y ~ p`` for every position of every window, and each position's log-sum-exp of the logits
    (``normed``: final-normed hidden states [n, T, H]). One window's [T, vocab] logits exist at a time."""
    torch = dec.torch
    n, T, H = normed.shape
    rows = _head_rows(T, H)
    # sampled on the CPU with a seeded generator, window after window: the same labels on every device
    gen = torch.Generator().manual_seed(seed)
    labels = torch.empty((n, T), dtype=torch.int64, device=normed.device)
    lse = torch.empty((n, T), dtype=normed.dtype, device=normed.device)
    logits = torch.empty((T, source.shape(dec.head_name)[0]), dtype=normed.dtype, device=normed.device)
    for s in range(n):
        for v0, w in _head_chunks(dec, source, rows, normed.device):
            logits[:, v0:v0 + w.shape[0]] = _mm(torch, normed[s], w.T)
        lse[s] = torch.logsumexp(logits, dim=-1)
        probs = logits.sub_(lse[s][:, None]).exp_()  # in place: one [T, vocab] buffer
        labels[s] = torch.multinomial(probs.cpu(), 1, generator=gen)[:, 0].to(normed.device)
        progress(f"Fisher: labels of sequence {s + 1}/{n}")
    return labels, lse


def _head_backward(dec: StreamedDecoder, source: WeightSource, hidden: "torch.Tensor", seed: int,
                   head_fisher: Callable[["torch.Tensor", "torch.Tensor"], None] | None,
                   progress: Callable[[str], None]) -> "torch.Tensor":
    """Gradient of each window's sampled log-likelihood ``Σ_t log p(y_t)`` with respect to the last decoder
    layer's output ``hidden`` [n, T, H]. With ``head_fisher``, it is called with each chunk of the output
    matrix's rows and their Fisher (sum over windows of each window's squared gradient, not yet divided by
    the tokens).

    d loss / d logits = onehot(y) − p: the vocabulary is walked in chunks of the output matrix (read twice:
    the softmax needs every chunk first, for sampling) and no whole-vocabulary gradient ever exists.
    """
    torch = dec.torch
    n, T, H = hidden.shape
    norm = dec.build_norm(source, hidden.device).requires_grad_(False)
    with torch.no_grad():
        normed = norm(hidden)
        labels, lse = _sample_labels(dec, source, normed, seed, progress)
        flat, y, lse = normed.reshape(n * T, H), labels.reshape(-1), lse.reshape(-1)
        d_normed = torch.zeros_like(flat)
        for v0, w in _head_chunks(dec, source, _head_rows(n * T, H), hidden.device):
            d_logits = _mm(torch, flat, w.T).sub_(lse[:, None]).exp_().neg_()  # −p [tokens, rows]
            hit = torch.nonzero((y >= v0) & (y < v0 + w.shape[0]))[:, 0]
            d_logits[hit, y[hit] - v0] += 1
            d_normed += _mm(torch, d_logits, w)
            if head_fisher is not None:
                acc = torch.zeros_like(w)
                for s in range(n):  # the square of each window's own gradient, as in one backward per window
                    g = _mm(torch, d_logits[s * T:(s + 1) * T].T, flat[s * T:(s + 1) * T])
                    acc.addcmul_(g, g)
                head_fisher(w, acc)
    # through the final norm (per token: all windows at once)
    with torch.enable_grad():
        h = hidden.detach().requires_grad_(True)
        norm(h).backward(d_normed.reshape(n, T, H))
    return h.grad


def _backward_layer(dec: StreamedDecoder, source: WeightSource, i: int, saved: Path, grad: "torch.Tensor",
                    names: list[str], device: str, pass_down: bool
                    ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Back-propagate ``grad`` (d loss / d output of layer ``i``, [n, T, H]) through layer ``i`` re-run from
    its ``saved`` input, one window at a time. Returns (name, weight, Fisher summed over windows) of the
    analysed ``names``; with ``pass_down``, ``grad`` becomes d loss / d input of the layer (in place)."""
    torch, arch = dec.torch, dec.cfg.arch
    layer = dec.build_layer(i, source, device)
    params = {}
    for rel, p in layer.named_parameters():
        # a module parameter may hold several analysed tensors (an MoE's gate_up_proj: stacked gate and up)
        wanted = any(arch.layer_prefix(i) + k in names for k in arch.from_module(rel, p))
        p.requires_grad_(wanted)
        if wanted:
            params[rel] = p
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    inputs = np.load(saved, mmap_mode="r")
    with torch.enable_grad(), _autocast(torch, device):  # whatever the caller's grad mode
        for s in range(grad.shape[0]):
            x = torch.from_numpy(np.array(inputs[s:s + 1])).to(device).requires_grad_(pass_down)
            dec.forward_layer(layer, x).backward(grad[s:s + 1])
            # one backward pass per window and the square of its gradient: the estimator of the module doc
            for n, p in params.items():
                acc[n].addcmul_(p.grad, p.grad)
                p.grad = None
            if pass_down:
                grad[s] = x.grad[0]  # this window's gradient is spent: its slot takes the one for layer i - 1
    del inputs
    saved.unlink()  # its disk is free as soon as the layer is done
    out = {}
    for rel, p in params.items():
        held, fisher = arch.from_module(rel, p.detach().cpu()), arch.from_module(rel, acc.pop(rel).cpu())
        for k, w in held.items():   # stacked experts [E, rows, cols] as the rows [E * rows, cols] ggml rounds
            out[arch.layer_prefix(i) + k] = (np.ascontiguousarray(w.reshape(-1, w.shape[-1]).numpy()),
                                             np.ascontiguousarray(fisher[k].reshape(-1, w.shape[-1]).numpy()))
    return [(n, *out[n]) for n in names]


def _predict_layer(fisher: list[tuple[str, np.ndarray, np.ndarray]], types: dict[str, list[Target]],
                   sq_mean: dict[str, np.ndarray], n_tok: int, threads: int | None,
                   progress: Callable[[str], None]) -> dict[str, dict[Target, float]]:
    """Predicted KLD per type of one layer's analysed tensors ((name, weight, Fisher sum over ``n_tok``
    tokens)); ``sq_mean``: imatrix weights for the quantizer, empty for plain RTN."""
    out = {}
    for name, w, f in fisher:
        f /= n_tok
        out[name] = predict_types(name, w, f, types[name], sq_mean.get(name), threads)
        progress(f"predicting {name}")
    return out


def predict_types(name: str, weight: np.ndarray, fisher: np.ndarray, types: list[Target],
                  importance: np.ndarray | None = None, threads: int | None = None) -> dict[Target, float]:
    """:func:`predicted_kld` of ``weight`` [out, in] for each of ``types``, estimated from a seeded sample
    of one row in :data:`ROW_SAMPLE` (every row of a small tensor).

    Why: quantizing every candidate over every row was most of the analysis (at 1.5B, ~240 of its ~395 s:
    ggml's imatrix-weighted K-quant search runs at ~14 M weights/s per type on 2 cores). ggml quantizes
    rows independently, so a row sample is exact for its rows; what it must estimate is how the tensor's
    total divides among rows, and the Fisher of a row varies a lot (outlier channels). So the estimate is
    a ratio: the :data:`REFERENCE` type (Q8_0, ~15x faster than the K-quant searches) is predicted on every
    row, and each other type is that total times its error over the reference's on the sampled rows. The
    per-row error of two types is nearly proportional (both scale with the row's Fisher and weight range),
    so the ratio varies little between rows and the sample pins it down; every type is compared on the same
    rows. Deterministic: the sample is seeded by the tensor's name.
    """
    rows, cols = weight.shape
    if ROW_SAMPLE <= 1 or rows < ROW_SAMPLE * MIN_SAMPLED_ROWS or cols % 32:
        return {t: predicted_kld(name, weight, fisher, t, importance, threads) for t in types}
    ref = _row_errors(name, weight, fisher, REFERENCE, importance, threads)
    pick = np.sort(np.random.default_rng(zlib.crc32(name.encode())).choice(rows, rows // ROW_SAMPLE,
                                                                          replace=False))
    w, f = np.ascontiguousarray(weight[pick]), np.ascontiguousarray(fisher[pick])
    total, part = ref.sum(), ref[pick].sum()
    # a sample whose reference error is zero (no Fisher on those rows) scales by the row count instead
    scale = total / part if part > 0 else rows / len(pick)
    return {t: 0.5 * float(total if t == REFERENCE else
                           scale * _row_errors(name, w, f, t, importance, threads).sum()) for t in types}


def predicted_kld(name: str, weight: np.ndarray, fisher: np.ndarray, t: Target,
                  importance: np.ndarray | None = None, threads: int | None = None) -> float:
    """``½ Σ F (W − Q_t(W))²``: the KLD (mean per token) predicted for quantizing ``weight`` [out, in] to
    ``t`` with ggml's RTN (``importance``: imatrix weights for its scale search)."""
    return 0.5 * float(_row_errors(name, weight, fisher, t, importance, threads).sum())


def _row_errors(name: str, weight: np.ndarray, fisher: np.ndarray, t: Target, importance: np.ndarray | None,
                threads: int | None) -> np.ndarray:
    """``Σ_j F_ij (W_ij − Q_t(W)_ij)²`` per row (float64 [out]), quantized :data:`CHUNK_VALUES` at a time."""
    rows = max(1, CHUNK_VALUES // weight.shape[1])
    out = np.empty(weight.shape[0])
    for r0 in range(0, weight.shape[0], rows):
        w = weight[r0:r0 + rows]
        err = rtn.quantize(name, w, t, importance, threads=threads).dequantize() - w
        err *= err
        out[r0:r0 + rows] = np.einsum("ij,ij->i", err, fisher[r0:r0 + rows], dtype=np.float64)
    return out
