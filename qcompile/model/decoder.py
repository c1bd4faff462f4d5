"""The network as calibration and verification run it: weight sources and a streamed decoder.

A :class:`WeightSource` gives float32 weights by HF tensor name in row ranges, so no big matrix is ever whole
in RAM: the checkpoint (:class:`CheckpointSource`), or it with some tensors replaced by quantized ones
(:class:`QuantizedSource`). :class:`StreamedDecoder` runs the decoder one layer at a time with transformers'
own layer modules, built from a source; the architecture description says which module classes and tensors.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

import numpy as np
from gguf import GGMLQuantizationType as T

from qcompile.errors import QCompileError
from qcompile.model.architectures import Architecture
from qcompile.model.checkpoint import Checkpoint
from qcompile.model.config import ModelConfig

if TYPE_CHECKING:
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

    def __init__(self, base: WeightSource, tensors: dict[str, QuantizedTensor], head: str = Architecture.HEAD):
        self.base, self.tensors = base, tensors
        # a quantized output matrix (``head``: its name), also when the checkpoint ties it to the embeddings
        self.head = head if head in tensors else None

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.tensors:
            return self.base.shape(name)
        qt = self.tensors[name]
        if qt.type == T.F32 and qt.shape[0] == 1:
            # a vector the calibration engine replaced (AWQ-folded norm or bias) travels as one float row
            return (qt.shape[1],)
        if ".experts." in name:   # stacked experts travel as [E * rows, cols]; the modules want [E, rows, cols]
            return tuple(self.base.shape(name))
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


class StreamedDecoder:
    """A Qwen decoder evaluated layer by layer from a weight source, with transformers' modules."""

    def __init__(self, cfg: ModelConfig):
        import torch
        import transformers
        self.torch = torch
        self.cfg = cfg
        try:
            mod = importlib.import_module(f"transformers.models.{cfg.arch.model_type}.modeling_{cfg.arch.model_type}")
        except ModuleNotFoundError:
            raise QCompileError(f"{cfg.arch.hf_name} needs a transformers that implements {cfg.arch.model_type} "
                                f"(installed: {transformers.__version__}; pip install -U transformers)") from None
        self.layer_cls = getattr(mod, f"{cfg.arch.hf_prefix}DecoderLayer")
        self.norm_cls = getattr(mod, f"{cfg.arch.hf_prefix}RMSNorm")
        hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.raw.items() if k != "model_type"},
                                                   model_type=cfg.arch.text_config_type)
        hf_cfg._attn_implementation = "sdpa"
        hf_cfg._experts_implementation = "eager"   # an MoE layer built on its own: transformers' loop over experts
        self.hf_cfg = hf_cfg
        self.rotary = getattr(mod, cfg.arch.rotary_class)(hf_cfg)
        self._rope_cache: dict = {}

    def _t(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def embed(self, source: WeightSource, ids: np.ndarray):
        """Embeddings of ``ids`` (reads only the rows used)."""
        uniq, inverse = np.unique(ids, return_inverse=True)
        rows = source.take(self.cfg.embed_name, uniq)
        return self._t(rows[inverse.reshape(ids.shape)])

    def build_layer(self, i: int, source: WeightSource, device: str = "cpu"):
        """Decoder layer ``i`` as a transformers module holding ``source``'s weights."""
        # built on the meta device and given uninitialised storage: every parameter is then overwritten by
        # load_state_dict (strict), so the random initialisation that construction would run is skipped
        # (kaiming init of a 1.5B layer's 47 M weights: ~0.4 s, on every build — the sensitivity analysis
        # builds each layer twice). Copied in, not assigned: the checkpoint's arrays may be read-only maps.
        adapt = self.cfg.arch.adapt_layer   # the description's tensors as the module's parameters
        with self.torch.device("meta"):
            layer = adapt(self.layer_cls(self.hf_cfg, i), i)
        if any(True for _ in layer.buffers()):  # a buffer load_state_dict may not fill: initialise for real
            layer = adapt(self.layer_cls(self.hf_cfg, i), i)
        else:
            layer = layer.to_empty(device="cpu")
        prefix = self.cfg.arch.layer_prefix(i)
        state = {n[len(prefix):]: self._t(source.full(n)) for n in self.cfg.layer_tensor_names(i)}
        layer.load_state_dict(self.cfg.arch.module_state(state), strict=True)
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
        norm.weight.data = self._t(source.full(self.cfg.arch.FINAL_NORM))
        return norm.to(device)

    def final_norm(self, source: WeightSource, hidden):
        with self.torch.no_grad():
            return self.build_norm(source, hidden.device)(hidden)

    @property
    def head_name(self) -> str:
        return self.cfg.head_source

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
