"""Verification: how far the quantized model is from the full-precision one.

Two paths, both on the same tokens:

* **reference** (PyTorch): the full-precision checkpoint and the dequantized artifact run side by side,
  one decoder layer at a time (transformers' own layer modules, weights loaded per layer, so a 7B model
  never sits in RAM whole) -> perplexity of each, mean KL divergence and top-1 agreement.
* **artifact** (the target runtime): the artifact loaded by llama.cpp (llama-cpp-python) -> its logits
  against the dequantized PyTorch model: relative error and top-1 agreement.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from qcompile.arch import ModelConfig

WeightSource = Callable[[str], np.ndarray]  # HF tensor name -> float32 array


@dataclass
class ReferenceMetrics:
    tokens: int
    windows: int
    ctx: int
    ppl_fp: float
    ppl_quant: float
    kld_mean: float
    kld_p99: float
    top1: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ArtifactMetrics:
    runtime: str
    tokens: int
    rel_error: float
    top1: float
    max_abs_error: float

    def as_dict(self) -> dict:
        return asdict(self)


def tokenize(model_dir: Path, text: str) -> list[int]:
    """Token ids of ``text`` with the checkpoint's own tokenizer (no special tokens added)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tok.encode(text, add_special_tokens=False).ids


def make_windows(ids: list[int], ctx: int, max_tokens: int) -> np.ndarray:
    """Non-overlapping windows of ``ctx`` tokens (at least one, shorter if the text is short)."""
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("evaluation text is too short (fewer than 2 tokens)")
    ctx = min(ctx, len(ids))
    n = max(1, len(ids) // ctx)
    return np.asarray(ids[: n * ctx], dtype=np.int64).reshape(n, ctx)


class StreamedDecoder:
    """A Qwen decoder evaluated layer by layer from a weight source, with transformers' modules."""

    def __init__(self, cfg: ModelConfig):
        import torch
        import transformers
        self.torch = torch
        self.cfg = cfg
        mod = importlib.import_module(f"transformers.models.{cfg.arch.model_type}.modeling_{cfg.arch.model_type}")
        self.layer_cls = getattr(mod, f"{cfg.arch.hf_prefix}DecoderLayer")
        self.norm_cls = getattr(mod, f"{cfg.arch.hf_prefix}RMSNorm")
        hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.raw.items() if k != "model_type"},
                                                   model_type=cfg.arch.model_type)
        hf_cfg._attn_implementation = "sdpa"
        self.hf_cfg = hf_cfg
        self.rotary = getattr(mod, f"{cfg.arch.hf_prefix}RotaryEmbedding")(hf_cfg)

    def _t(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def embed(self, source: WeightSource, ids: np.ndarray):
        table = source("model.embed_tokens.weight")
        return self._t(table[ids])

    def layer(self, i: int, source: WeightSource, hidden):
        torch = self.torch
        layer = self.layer_cls(self.hf_cfg, i)
        prefix = f"model.layers.{i}."
        state = {n[len(prefix):]: self._t(source(n)) for n in self.cfg.layer_tensor_names(i)}
        layer.load_state_dict(state, strict=True)
        layer.eval()
        n, t = hidden.shape[:2]
        pos = torch.arange(t)[None].expand(n, -1)
        with torch.no_grad():
            pe = self.rotary(hidden, pos)
            out = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=pe)
        return out[0] if isinstance(out, tuple) else out

    def head(self, source: WeightSource):
        """(final norm module, lm_head weight) for turning hidden states into logits."""
        norm = self.norm_cls(self.cfg.hidden_size, eps=self.cfg.rms_norm_eps)
        norm.weight.data = self._t(source("model.norm.weight"))
        name = "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
        return norm, self._t(source(name))


def reference_eval(cfg: ModelConfig, fp: WeightSource, quant: WeightSource, windows: np.ndarray,
                   keep_logits: int = 0, progress: Callable[[str], None] = lambda s: None
                   ) -> tuple[ReferenceMetrics, np.ndarray | None]:
    """Run both models on ``windows``; return metrics and the first ``keep_logits`` quantized logits of window 0."""
    dec = StreamedDecoder(cfg)
    torch = dec.torch
    h_fp, h_q = dec.embed(fp, windows), dec.embed(quant, windows)
    for i in range(cfg.num_layers):
        progress(f"layer {i + 1}/{cfg.num_layers}")
        h_fp = dec.layer(i, fp, h_fp)
        h_q = dec.layer(i, quant, h_q)
    (norm_fp, w_fp), (norm_q, w_q) = dec.head(fp), dec.head(quant)
    nll_fp = nll_q = 0.0
    kl: list[np.ndarray] = []
    agree = count = 0
    kept = None
    ids = torch.from_numpy(windows)
    with torch.no_grad():
        for w in range(windows.shape[0]):
            for s in range(0, windows.shape[1], 128):
                sl = slice(s, min(s + 128, windows.shape[1]))
                lf = norm_fp(h_fp[w, sl]) @ w_fp.T
                lq = norm_q(h_q[w, sl]) @ w_q.T
                if w == 0 and s < keep_logits:
                    part = lq[: keep_logits - s].numpy().copy()
                    kept = part if kept is None else np.concatenate([kept, part])
                lpf, lpq = torch.log_softmax(lf, -1), torch.log_softmax(lq, -1)
                kl.append((lpf.exp() * (lpf - lpq)).sum(-1).numpy())
                agree += int((lf.argmax(-1) == lq.argmax(-1)).sum())
                count += lf.shape[0]
                tgt = ids[w, sl.start + 1: sl.stop + 1]
                m = tgt.shape[0]
                if m:
                    nll_fp -= float(lpf[:m].gather(1, tgt[:, None]).sum())
                    nll_q -= float(lpq[:m].gather(1, tgt[:, None]).sum())
    kls = np.concatenate(kl)
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    return ReferenceMetrics(
        tokens=int(windows.size), windows=int(windows.shape[0]), ctx=int(windows.shape[1]),
        ppl_fp=float(np.exp(nll_fp / predicted)), ppl_quant=float(np.exp(nll_q / predicted)),
        kld_mean=float(kls.mean()), kld_p99=float(np.quantile(kls, 0.99)), top1=agree / count,
    ), kept


def compare_logits(runtime: str, got: np.ndarray, ref: np.ndarray) -> ArtifactMetrics:
    rel = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    return ArtifactMetrics(runtime, int(got.shape[0]), rel, top1, float(np.abs(got - ref).max()))
