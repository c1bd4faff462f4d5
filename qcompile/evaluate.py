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
from typing import Callable, Protocol

import numpy as np
from gguf import GGMLQuantizationType as T

from qcompile.arch import ModelConfig
from qcompile.checkpoint import Checkpoint
from quantizers.tensor import QuantizedTensor

HEAD_CHUNK_BYTES = 64 << 20  # float32 logits per vocabulary chunk



class WeightSource(Protocol):
    """Float32 weights by HF tensor name, readable in row ranges so no big matrix is ever whole in RAM."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def rows(self, name: str, start: int, stop: int) -> np.ndarray: ...

    def take(self, name: str, ids: np.ndarray) -> np.ndarray: ...

    def full(self, name: str) -> np.ndarray: ...


class CheckpointSource:
    """The full-precision weights, straight from the checkpoint."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ckpt.entry(name).shape

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.ckpt.read_rows(name, start, stop)

    def take(self, name: str, ids: np.ndarray) -> np.ndarray:
        return np.concatenate([self.ckpt.read_rows(name, int(i), int(i) + 1) for i in ids])

    def full(self, name: str) -> np.ndarray:
        return self.ckpt.read(name)


class QuantizedSource:
    """A base source with some tensors replaced by quantized ones (dequantized on read): the weights of a
    quantization held in memory, before (or without) any export."""

    def __init__(self, base: WeightSource, tensors: dict[str, QuantizedTensor]):
        self.base, self.tensors = base, tensors
        # a quantized output matrix, also when the checkpoint ties it to the (float) embeddings
        self.head = "lm_head.weight" if "lm_head.weight" in tensors else None

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.tensors:
            return self.base.shape(name)
        qt = self.tensors[name]
        if qt.type == T.F32 and qt.shape[0] == 1:
            # a vector the calibration engine replaced (AWQ-folded norm or bias) travels as one float row
            return (qt.shape[1],)
        return tuple(qt.shape)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.full(name).reshape(self.shape(name)[0], -1)[start:stop] if name in self.tensors \
            else self.base.rows(name, start, stop)

    def take(self, name: str, ids: np.ndarray) -> np.ndarray:
        return self.full(name)[ids] if name in self.tensors else self.base.take(name, ids)

    def full(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            return self.base.full(name)
        return self.tensors[name].dequantize().reshape(self.shape(name))


class GGUFSource:
    """Weights read back from a written GGUF and dequantized: exactly what the runtime computes with."""

    def __init__(self, path: Path, cfg: ModelConfig):
        from gguf import GGUFReader
        self.tensors = {t.name: t for t in GGUFReader(path).tensors}
        self.names = dict(cfg.name_map)
        if cfg.tie_word_embeddings or "output.weight" not in self.tensors:
            self.names["lm_head.weight"] = "token_embd.weight"

    def _t(self, name: str):
        return self.tensors[self.names[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in reversed(self._t(name).shape.tolist()))

    def _decode(self, name: str, raw: np.ndarray) -> np.ndarray:
        t = self._t(name)
        cols = self.shape(name)[-1]
        raw = raw.reshape(raw.shape[0] if raw.ndim > 1 else 1, -1)
        return QuantizedTensor(t.name, T(t.tensor_type), (raw.shape[0], cols), raw).dequantize()

    def _raw(self, name: str) -> np.ndarray:
        t = self._t(name)
        rows = int(np.prod(self.shape(name)[:-1], dtype=np.int64)) if len(self.shape(name)) > 1 else 1
        return np.asarray(t.data).reshape(rows, -1)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._decode(name, self._raw(name)[start:stop])

    def take(self, name: str, ids: np.ndarray) -> np.ndarray:
        return self._decode(name, self._raw(name)[ids])

    def full(self, name: str) -> np.ndarray:
        return self._decode(name, self._raw(name)).reshape(self.shape(name))


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
        self._rope_cache: dict = {}

    def _t(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def embed(self, source: WeightSource, ids: np.ndarray):
        """Embeddings of ``ids`` (reads only the rows used)."""
        uniq, inverse = np.unique(ids, return_inverse=True)
        rows = source.take("model.embed_tokens.weight", uniq)
        return self._t(rows[inverse.reshape(ids.shape)])

    def build_layer(self, i: int, source: WeightSource, device: str = "cpu"):
        """Decoder layer ``i`` as a transformers module holding ``source``'s weights."""
        # built on the meta device and given uninitialised storage: every parameter is then overwritten by
        # load_state_dict (strict), so the random initialisation that construction would run is skipped
        # (kaiming init of a 1.5B layer's 47 M weights: ~0.4 s, on every build — the sensitivity analysis
        # builds each layer twice). Copied in, not assigned: the checkpoint's arrays may be read-only maps.
        with self.torch.device("meta"):
            layer = self.layer_cls(self.hf_cfg, i)
        if any(True for _ in layer.buffers()):  # a buffer load_state_dict may not fill: initialise for real
            layer = self.layer_cls(self.hf_cfg, i)
        else:
            layer = layer.to_empty(device="cpu")
        prefix = f"model.layers.{i}."
        state = {n[len(prefix):]: self._t(source.full(n)) for n in self.cfg.layer_tensor_names(i)}
        layer.load_state_dict(state, strict=True)
        return layer.eval().to(device)

    def forward_layer(self, layer, h):
        """A decoder layer on ``h`` [n, T, H] (causal, positions 0..T-1), recording gradients if enabled."""
        pos = self.torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)
        cos, sin = self._rope(h)
        out = layer(h, attention_mask=None, position_ids=pos,
                    position_embeddings=(cos.expand(h.shape[0], -1, -1), sin.expand(h.shape[0], -1, -1)))
        return out[0] if isinstance(out, tuple) else out

    def _rope(self, h):
        """RoPE's cos/sin for positions 0..T-1 ([1, T, head_dim], ``h``'s dtype), computed once per length on
        one thread. Why: torch's vectorised cos/sin switch to a scalar tail at chunk boundaries that depend
        on how a parallel loop was split, which varied from run to run on a loaded machine; the rotary
        tables then differed in the last bit and so did the calibrated artifacts (1 run in 4 under load)."""
        key = (h.shape[1], h.device, h.dtype)
        if key not in self._rope_cache:
            torch = self.torch
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with torch.no_grad():
                    self._rope_cache[key] = self.rotary(h[:1], torch.arange(h.shape[1], device=h.device)[None])
            finally:
                torch.set_num_threads(threads)
        return self._rope_cache[key]

    def run_layer(self, layer, hidden, batch: int = 0):
        """Apply a decoder layer to ``hidden`` [n, T, H] (``batch`` sequences at a time; 0 = all)."""
        torch = self.torch
        n = hidden.shape[0]
        batch = batch or n
        with torch.no_grad():
            outs = [self.forward_layer(layer, hidden[b:b + batch]) for b in range(0, n, batch)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def layer(self, i: int, source: WeightSource, hidden):
        return self.run_layer(self.build_layer(i, source), hidden)

    def build_norm(self, source: WeightSource, device="cpu"):
        """The final RMSNorm as a module holding ``source``'s weight."""
        norm = self.norm_cls(self.cfg.hidden_size, eps=self.cfg.rms_norm_eps)
        norm.weight.data = self._t(source.full("model.norm.weight"))
        return norm.to(device)

    def final_norm(self, source: WeightSource, hidden):
        with self.torch.no_grad():
            return self.build_norm(source, hidden.device)(hidden)

    @property
    def head_name(self) -> str:
        return "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"

    def logits_chunks(self, source: WeightSource, hidden):
        """Yield (first vocab id, logits [tokens, chunk]) over the vocabulary, one chunk of lm_head at a time."""
        head = getattr(source, "head", None) or self.head_name  # a source may carry its own output matrix
        vocab = source.shape(head)[0]
        step = max(256, HEAD_CHUNK_BYTES // (4 * max(1, hidden.shape[0])))
        for v0 in range(0, vocab, step):
            w = self._t(source.rows(head, v0, min(v0 + step, vocab)))
            # not `yield` inside `no_grad()`: grad mode is thread state, and two of these generators
            # interleaved (fp and quantized, zipped) would restore each other's saved mode, leaving it off
            with self.torch.no_grad():
                chunk = hidden @ w.T
            yield v0, chunk


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
