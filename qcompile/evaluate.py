"""Verification: how far the quantized model is from the full-precision one.

Two paths, both on the same tokens:

* **reference** (PyTorch): the full-precision checkpoint and the dequantized artifact run side by side,
  one decoder layer at a time (transformers' own layer modules, weights loaded per layer, so a 7B model
  never sits in RAM whole) -> perplexity of each, mean KL divergence and top-1 agreement.
* **artifact** (the target runtime): the artifact loaded by llama.cpp (llama-cpp-python) -> its logits
  against the dequantized PyTorch model: relative error and top-1 agreement.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from qcompile.model import ModelConfig, StreamedDecoder, WeightSource
from qcompile.report_types import ArtifactMetrics, ReferenceMetrics


def tokenize(model_dir: Path, text: str) -> list[int]:
    """Token ids of ``text`` with the checkpoint's own tokenizer (no special tokens added)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tok.encode(text, add_special_tokens=False).ids


def make_windows(ids: list[int], ctx: int, max_tokens: int, stride: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``ctx`` tokens every ``stride`` tokens (default ``ctx``: non-overlapping) over the first
    ``max_tokens`` of ``ids``, and which positions each window scores.

    Returns ``(windows [n, ctx] int64, score [n, ctx] bool)``: ``score[k, j]`` says that window ``k``'s
    prediction at position ``j`` (of token ``j + 1``) counts. Every token after the first is scored
    exactly once, by the first window that holds it with its preceding context: the usual sliding
    window perplexity; with ``stride < ctx`` each scored token sees at least ``ctx - stride`` tokens of
    context. A final window ending at the text's end covers any remainder.
    """
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("evaluation text is too short (fewer than 2 tokens)")
    ctx = min(ctx, len(ids))
    stride = max(1, min(stride or ctx, ctx))
    starts = list(range(0, len(ids) - ctx + 1, stride))
    if starts[-1] + ctx < len(ids):
        starts.append(len(ids) - ctx)
    windows = np.stack([np.asarray(ids[b:b + ctx], dtype=np.int64) for b in starts])
    score = np.zeros(windows.shape, dtype=bool)
    last = 0  # highest target index scored so far
    for k, b in enumerate(starts):
        target = b + np.arange(1, ctx + 1)          # token index each position predicts
        score[k] = (target > last) & (target < b + ctx)
        last = b + ctx - 1
    return windows, score


class _OnlineSoftmax:
    """Running log-sum-exp, argmax and target logit over vocabulary chunks, per token (float64)."""

    def __init__(self, n: int):
        self.m = np.full(n, -np.inf)
        self.s = np.zeros(n)
        self.best = np.full(n, -np.inf)
        self.arg = np.zeros(n, dtype=np.int64)
        self.target = np.zeros(n)

    def update(self, v0: int, logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Fold in one chunk; returns the rescale factor applied to earlier sums (for dependants)."""
        lg = logits.astype(np.float64)
        new_m = np.maximum(self.m, lg.max(1))
        rescale = np.exp(self.m - new_m)
        self.s = self.s * rescale + np.exp(lg - new_m[:, None]).sum(1)
        self.m = new_m
        cmax, carg = lg.max(1), lg.argmax(1)
        better = cmax > self.best
        self.best[better], self.arg[better] = cmax[better], carg[better] + v0
        inside = (targets >= v0) & (targets < v0 + lg.shape[1])
        self.target[inside] = lg[inside, targets[inside] - v0]
        return rescale

    @property
    def lse(self) -> np.ndarray:
        return self.m + np.log(self.s)


def _compare(fp_chunks, q_chunks, targets: np.ndarray, keep_logits: int = 0
             ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Per-token NLL (fp and quantized), KL(fp || quant) and top-1 agreement from two logit streams
    that yield (first vocab id, logits [tokens, chunk]) over the same vocabulary chunks."""
    sf, sq = _OnlineSoftmax(len(targets)), _OnlineSoftmax(len(targets))
    cross = np.zeros(len(targets))  # running sum of exp(lf - m_f) * (lf - lq)
    kept = np.empty((keep_logits, 0), dtype=np.float32) if keep_logits else None
    for (v0, lf), (v1, lq) in zip(fp_chunks, q_chunks):
        assert v0 == v1
        lf_np, lq_np = np.asarray(lf, dtype=np.float32), np.asarray(lq, dtype=np.float32)
        rescale = sf.update(v0, lf_np, targets)
        sq.update(v0, lq_np, targets)
        cross = cross * rescale + (np.exp(lf_np - sf.m[:, None]) * (lf_np.astype(np.float64) - lq_np)).sum(1)
        if kept is not None:
            kept = np.concatenate([kept, lq_np[:keep_logits]], axis=1)
    return {"nll_fp": sf.lse - sf.target, "nll_q": sq.lse - sq.target, "kld": cross / sf.s - sf.lse + sq.lse,
            "same": (sf.arg == sq.arg)}, kept


def _metrics(per_token: dict[str, np.ndarray], n_win: int, ctx: int) -> ReferenceMetrics:
    kld = per_token["kld"]
    return ReferenceMetrics(
        tokens=int(len(kld)), windows=int(n_win), ctx=int(ctx),
        ppl_fp=float(np.exp(per_token["nll_fp"].mean())), ppl_quant=float(np.exp(per_token["nll_q"].mean())),
        kld_mean=float(kld.mean()), kld_p99=float(np.quantile(kld, 0.99)), top1=float(per_token["same"].mean()))


def _targets(windows: np.ndarray, score: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Next-token targets (flattened) and the mask of positions that count."""
    n_win = windows.shape[0]
    targets = np.concatenate([windows[:, 1:], np.full((n_win, 1), -1)], axis=1).reshape(-1)
    mask = targets >= 0
    if score is not None:
        mask &= score.reshape(-1)
    return targets, mask


def reference_eval(cfg: ModelConfig, fp: WeightSource, quant: WeightSource, windows: np.ndarray,
                   keep_logits: int = 0, progress: Callable[[str], None] = lambda s: None,
                   score: np.ndarray | None = None) -> tuple[ReferenceMetrics, np.ndarray | None]:
    """Run both models on ``windows``; return metrics over the ``score``d positions (default: all with a
    next token) and the first ``keep_logits`` quantized logits of window 0.

    The vocabulary is processed in chunks with an online softmax, so neither lm_head nor the full
    [tokens, vocab] logits are ever materialised.
    """
    dec = StreamedDecoder(cfg)
    n_win, ctx = windows.shape
    same = quant is fp  # the fp model against itself (its perplexity alone): run it once
    h_fp = dec.embed(fp, windows)
    h_q = h_fp if same else dec.embed(quant, windows)
    for i in range(cfg.num_layers):
        h_fp = dec.layer(i, fp, h_fp)
        h_q = h_fp if same else dec.layer(i, quant, h_q)
        progress(f"layer {i + 1}/{cfg.num_layers}")
    h_fp = dec.final_norm(fp, h_fp).reshape(n_win * ctx, -1)
    h_q = h_fp if same else dec.final_norm(quant, h_q).reshape(n_win * ctx, -1)
    targets, mask = _targets(windows, score)
    per_token, kept = _compare(((v, x.numpy()) for v, x in dec.logits_chunks(fp, h_fp)),
                               ((v, x.numpy()) for v, x in dec.logits_chunks(quant, h_q)), targets, keep_logits)
    return _metrics({k: v[mask] for k, v in per_token.items()}, n_win, ctx), kept


def runtime_eval(cfg: ModelConfig, fp: WeightSource, windows: np.ndarray, score: np.ndarray | None,
                 runtime_logits: Callable[[np.ndarray], np.ndarray],
                 progress: Callable[[str], None] = lambda s: None) -> ReferenceMetrics:
    """Metrics of a runtime's logits (``runtime_logits(window) -> [ctx, vocab]``) against the fp model.

    The fp side streams as in :func:`reference_eval`; the runtime's logits are taken one window at a time.
    """
    dec = StreamedDecoder(cfg)
    n_win, ctx = windows.shape
    h = dec.embed(fp, windows)
    for i in range(cfg.num_layers):
        h = dec.layer(i, fp, h)
        progress(f"layer {i + 1}/{cfg.num_layers}")
    h = dec.final_norm(fp, h)
    targets, mask = _targets(windows, score)
    targets, mask = targets.reshape(n_win, ctx), mask.reshape(n_win, ctx)
    parts: dict[str, list[np.ndarray]] = {}
    for k in range(n_win):
        got = runtime_logits(windows[k])
        fp_chunks = [(v, x.numpy()) for v, x in dec.logits_chunks(fp, h[k])]
        q_chunks = ((v, got[:, v:v + x.shape[1]]) for v, x in fp_chunks)
        per_token, _ = _compare(fp_chunks, q_chunks, targets[k])
        for key, v in per_token.items():
            parts.setdefault(key, []).append(v[mask[k]])
        progress(f"window {k + 1}/{n_win}")
    return _metrics({key: np.concatenate(v) for key, v in parts.items()}, n_win, ctx)


def compare_logits(runtime: str, got: np.ndarray, ref: np.ndarray) -> ArtifactMetrics:
    rel = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    return ArtifactMetrics(runtime, int(got.shape[0]), rel, top1, float(np.abs(got - ref).max()))
