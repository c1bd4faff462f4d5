"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales, searched on calibration data.

For a group of linears that read the same input ``x`` (q/k/v after the attention norm, gate/up after
the MLP norm, down after up, o after v), scaling input channel ``j`` of the weights by ``s_j`` and
dividing the producer of ``x`` (the norm's weight, or the previous linear's rows) by ``s_j`` leaves
the full-precision model unchanged, but moves quantization error away from the channels with large
activations. ``s = mean|x|^alpha`` (normalised); ``alpha`` is chosen on a grid by the group's
output error ``sum_i ||(Q(W_i diag(s)) diag(s)^-1 - W_i) x^T||^2`` on a calibration sample, ``Q``
rounding onto (a fast proxy of) the target grid. ``alpha = 0`` is plain quantization, so the search
never picks scales that do worse than no scaling on the sample.

Which tensors are producers and consumers is the model's business (``Architecture.SCALE_GROUPS``);
:func:`transform_layer` is the AWQ methods' layer hook, which the calibration engine calls before quantizing.
The clip search of the reference implementation is the grid's own scale search here (ggml's for GGUF
types, :mod:`quantizers.intgrid` for integer grids), run with the rescaled activation importance.
The search itself ranks alphas with a min/max proxy of the target grid (:func:`proxy`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from quantizers import linalg
from quantizers.grids import IntType, Target, grid

if TYPE_CHECKING:
    from qcompile.model import Architecture

N_GRID = 20
_ASYMMETRIC = {T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K}


def proxy(target: Target):
    """A fast stand-in for ``target`` in the scale search: same bits and sub-block size (the whole row for a
    per-channel grid), min/max scales.

    ggml's real search costs ~1 s per alpha for a layer's weights on a CPU; the proxy ranks alphas the
    same way at a fraction of the cost (AutoAWQ searches with plain min/max pseudo-quantization too).
    The final rounding uses the real grid. Float targets: identity.
    """
    if isinstance(target, IntType):  # per-channel: the group is the row, known only from the weight
        bits, asym, group_for = target.bits, not target.sym, target.group_for
    else:
        try:
            g = grid(target)
        except (KeyError, ValueError):
            return lambda w: w
        bits, asym = int(np.log2(len(g.levels))), target in _ASYMMETRIC
        group_for = lambda cols: g.sub
    qmax = (1 << bits) - 1

    def fake_quant(w: torch.Tensor) -> torch.Tensor:
        x = w.reshape(w.shape[0], -1, group_for(w.shape[1]))
        if asym:
            lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
            d = ((hi - lo) / qmax).clamp(min=1e-12)
            z = torch.round(-lo / d)
            q = (torch.clamp(torch.round(x / d) + z, 0, qmax) - z) * d
        else:
            d = (x.abs().amax(-1, keepdim=True) / (qmax // 2)).clamp(min=1e-12)
            q = torch.clamp(torch.round(x / d), -(qmax // 2) - 1, qmax // 2) * d
        return q.reshape(w.shape)
    return fake_quant


def search_scales(x: torch.Tensor, act_abs_mean: np.ndarray, weights: list[tuple[np.ndarray, Target]],
                  n_grid: int = N_GRID) -> tuple[np.ndarray, float]:
    """Best per-input-channel scales for linears sharing input ``x`` [tokens, in] (a calibration sample).

    ``act_abs_mean``: mean |x| per channel over all calibration tokens; ``weights``: each consumer's
    [out, in] weight and target type. Returns ``(scales [in] float32, relative error reduction vs
    alpha=0)``.
    """
    # error products in bf16 with f32 sums where bf16 is fast: plenty to rank alphas, 3x faster than f32
    dt = torch.bfloat16 if linalg.bf16_is_fast(x.device.type) else torch.float32
    xt = x.to(dt).T.contiguous()                              # [in, tokens]
    ws = [(torch.from_numpy(np.asarray(w, np.float32)), proxy(t)) for w, t in weights]
    base = np.maximum(act_abs_mean.astype(np.float64), 1e-8)
    best, best_loss, loss0 = np.ones_like(base, dtype=np.float32), np.inf, None
    for k in range(n_grid):
        alpha = k / n_grid
        s = base ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        st = torch.from_numpy(s)
        loss = 0.0
        for w, quant in ws:
            err = (quant(w * st) / st - w).to(dt) @ xt
            loss += float(err.float().square().sum())
        if loss0 is None:
            loss0 = loss
        if loss < best_loss:
            best, best_loss = s, loss
    return best, (1 - best_loss / loss0) if loss0 else 0.0


def transform_layer(view) -> None:
    """The AWQ methods' layer hook (``view``: :class:`calibration.capture.LayerView`): search scales for each of
    the architecture's scale groups on the layer's sampled inputs, fold them into every linear and into the
    producers (norms, biases), and rescale the statistics to the folded inputs. Reads all the layer's linears up
    front (each is folded by one group and read by another)."""
    arch, prefix = view.arch, view.prefix
    weights = {lin: view.read(f"{prefix}{lin}.weight") for lin in view.linears}
    scales = {}
    for producer, stat_of, consumers in arch.SCALE_GROUPS:
        if not foldable(producer, consumers, weights):
            continue
        st = view.stats[stat_of]
        pairs = [(weights[c], view.types[f"{prefix}{c}.weight"]) for c in consumers]
        scales[producer], _gain = search_scales(torch.cat(st.samples), st.abs / st.tokens, pairs)
        st.samples.clear()
        view.calib[stat_of].rescale(scales[producer])
    present = set(view.tensors)
    params = {rel: view.read(prefix + rel).astype(np.float32) for rel in producer_params(arch, scales)
              if prefix + rel in present}
    fold(arch, scales, weights, params)
    view.weights = weights
    view.params = {prefix + rel: v for rel, v in params.items()}


def foldable(producer: str, consumers: tuple[str, ...], weights: dict[str, np.ndarray]) -> bool:
    """False for v -> o under GQA (v's rows do not map one-to-one onto o's columns)."""
    return producer not in weights or weights[producer].shape[0] == weights[consumers[0]].shape[1]


def producer_params(arch: Architecture, scales: dict[str, np.ndarray]) -> list[str]:
    """The non-linear tensors (relative names) that folding ``scales`` changes: norms' weights, biases."""
    return [arch.producer_param(p) for p in scales]


def fold(arch: Architecture, scales: dict[str, np.ndarray], weights: dict[str, np.ndarray],
         params: dict[str, np.ndarray]) -> None:
    """Fold AWQ scales (by producer) into a layer, in place, leaving its full-precision function unchanged.

    ``weights``: linear (relative name) -> [out, in]; ``params``: norms' weights and biases by relative
    name. Consumers' input columns are multiplied by ``s``, the producer's output channels divided by it.
    """
    for producer, _stat, consumers in arch.SCALE_GROUPS:
        s = scales.get(producer)
        if s is None or not foldable(producer, consumers, weights):
            continue
        for c in consumers:
            weights[c] = weights[c] * s[None, :]
        if producer in weights:
            weights[producer] = weights[producer] / s[:, None]
            bias = arch.bias_of(producer)
            if bias in params:
                params[bias] = params[bias] / s
        else:
            params[f"{producer}.weight"] = params[f"{producer}.weight"] / s
