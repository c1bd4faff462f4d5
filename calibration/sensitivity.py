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

**Cost.** The analysis holds the float32 model in memory with gradients and one accumulator for the
tensors analysed (about 3 x 4 bytes per parameter: ~6 GB for a 0.5B model) and runs on ``--device``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from qcompile.arch import ModelConfig
from qcompile.evaluate import StreamedDecoder, WeightSource
from quantizers import rtn
from quantizers.grids import Target

SAMPLES, SEQLEN = 16, 512   # calibration sequences (and their length at most) for the Fisher
HEAD = "lm_head.weight"
CHUNK_VALUES = 1 << 24      # weights quantized at a time when predicting (bounds the temporary copies)


@dataclass
class Fisher:
    """The per-token mean diagonal Fisher of some weights (HF names), and each decoder linear's mean
    squared input (llama.cpp's imatrix) seen on the way."""
    diag: dict[str, np.ndarray]
    sq_mean: dict[str, np.ndarray]
    sequences: int
    tokens: int


def fisher_diagonal(cfg: ModelConfig, source: WeightSource, tokens: np.ndarray, names: list[str], *,
                    device: str = "cpu", seed: int = 0,
                    progress: Callable[[int], None] = lambda i: None) -> Fisher:
    """Diagonal Fisher of the weights ``names`` (decoder linears and/or ``lm_head.weight``) over the
    calibration windows ``tokens`` [n, T] (one backward pass per window), in float32 on ``device``."""
    import torch
    from calibration.capture import LINEARS
    dec = StreamedDecoder(cfg)
    wanted = set(names)
    params: dict[str, "torch.Tensor"] = {}
    sq_sum: dict[str, "torch.Tensor"] = {}
    layers, hooks = [], []

    def record(name: str):
        def hook(_mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            sq_sum[name] = sq_sum.get(name, 0) + x.square().sum(0)
        return hook

    for i in range(cfg.num_layers):
        layer = dec.build_layer(i, source, device)
        for rel, p in layer.named_parameters():
            full = f"model.layers.{i}.{rel}"
            p.requires_grad_(full in wanted)
            if full in wanted:
                params[full] = p
        for lin in LINEARS:
            hooks.append(layer.get_submodule(lin).register_forward_pre_hook(record(f"model.layers.{i}.{lin}.weight")))
        layers.append(layer)
    norm = dec.build_norm(source, device).requires_grad_(False)
    head = torch.from_numpy(np.ascontiguousarray(source.full(dec.head_name), dtype=np.float32)).to(device)
    if HEAD in wanted:
        params[HEAD] = head.requires_grad_(True)
    missing = wanted - set(params)
    if missing:
        raise ValueError(f"no such weights to analyse: {', '.join(sorted(missing))}")
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    # sampled on the CPU with a seeded generator: the same labels on every device
    gen = torch.Generator().manual_seed(seed)
    try:
        for s in range(tokens.shape[0]):
            with torch.enable_grad():  # whatever the caller's grad mode
                h = dec.embed(source, tokens[s:s + 1]).to(device)
                for layer in layers:
                    h = dec.forward_layer(layer, h)
                logp = torch.log_softmax(norm(h)[0] @ head.T, dim=-1)         # [T, vocab]
                y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).to(device)
                logp.gather(1, y).sum().backward()
            del logp
            for n, p in params.items():
                acc[n].addcmul_(p.grad, p.grad)
                p.grad = None
            progress(s)
    finally:
        for hk in hooks:
            hk.remove()
    n_tok = int(tokens.size)
    diag = {n: (a / n_tok).cpu().numpy() for n, a in acc.items()}
    sq_mean = {n: (v / n_tok).cpu().numpy().astype(np.float32) for n, v in sq_sum.items()}
    return Fisher(diag, sq_mean, int(tokens.shape[0]), n_tok)


def predicted_kld(name: str, weight: np.ndarray, fisher: np.ndarray, t: Target,
                  importance: np.ndarray | None = None, threads: int | None = None) -> float:
    """``½ Σ F (W − Q_t(W))²``: the KLD (mean per token) predicted for quantizing ``weight`` [out, in] to
    ``t`` with ggml's RTN (``importance``: imatrix weights for its scale search)."""
    rows = max(1, CHUNK_VALUES // weight.shape[1])
    total = 0.0
    for r0 in range(0, weight.shape[0], rows):
        w = weight[r0:r0 + rows]
        err = rtn.quantize(name, w, t, importance, threads=threads).dequantize() - w
        err *= err
        total += float(np.einsum("ij,ij->", err, fisher[r0:r0 + rows], dtype=np.float64))
    return 0.5 * total


def sensitivity(source: WeightSource, fisher: Fisher, types: dict[str, list[Target]], *, use_imatrix: bool,
                threads: int | None = None, progress: Callable[[str], None] = lambda n: None
                ) -> dict[str, dict[Target, float]]:
    """Predicted KLD per tensor (HF name) and candidate type. ``use_imatrix``: quantize the decoder linears
    with their input statistics, as the calibrated methods do (the output matrix always by plain RTN, as
    the pipeline quantizes it)."""
    out: dict[str, dict[Target, float]] = {}
    for name, cands in types.items():
        w = np.ascontiguousarray(source.full(name), dtype=np.float32)
        imp = fisher.sq_mean.get(name) if use_imatrix else None
        out[name] = {t: predicted_kld(name, w, fisher.diag[name], t, imp, threads) for t in cands}
        progress(name)
    return out
