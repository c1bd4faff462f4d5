"""Architecture descriptions: what differs between Qwen2-family and Qwen3 lives here, as data.

The loader, the exporters and the evaluator read these fields instead of branching on names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompile.errors import QCompileError


@dataclass(frozen=True)
class Arch:
    hf_name: str          # config.json "architectures"[0]
    model_type: str       # config.json "model_type"
    gguf_arch: str        # llama.cpp architecture name
    qkv_bias: bool        # q/k/v projections carry a bias (Qwen2 family)
    qk_norm: bool         # per-head RMSNorm on q and k (Qwen3)
    hf_prefix: str        # transformers class prefix: {prefix}DecoderLayer, {prefix}RotaryEmbedding, ...


ARCHES: dict[str, Arch] = {
    a.hf_name: a for a in (
        Arch("Qwen2ForCausalLM", "qwen2", "qwen2", qkv_bias=True, qk_norm=False, hf_prefix="Qwen2"),
        Arch("Qwen3ForCausalLM", "qwen3", "qwen3", qkv_bias=False, qk_norm=True, hf_prefix="Qwen3"),
    )
}
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHES.values()}

# Per-layer tensors, HF suffix -> GGUF suffix. Linear weights are 2-D [out, in]; the rest 1-D.
LAYER_TENSORS: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_TENSORS: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


@dataclass(frozen=True)
class ModelConfig:
    """The hyper-parameters every stage needs, normalised from config.json (transformers 4.x or 5.x)."""
    arch: Arch
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None
    raw: dict[str, Any]

    @property
    def name_map(self) -> dict[str, str]:
        """HF tensor name -> GGUF tensor name for every tensor this model may contain."""
        m = dict(TOP_TENSORS)
        for i in range(self.num_layers):
            for hf, gg in LAYER_TENSORS.items():
                m[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
        return m

    def layer_tensor_names(self, i: int) -> list[str]:
        """HF names of layer i's tensors that this architecture has."""
        names = []
        for hf in LAYER_TENSORS:
            if ".bias" in hf and not self.arch.qkv_bias:
                continue
            if "_norm." in hf and "self_attn" in hf and not self.arch.qk_norm:
                continue
            names.append(f"model.layers.{i}.{hf}")
        return names

    def expected_tensor_names(self) -> list[str]:
        """Every HF tensor name the checkpoint must provide, in export order."""
        names = ["model.embed_tokens.weight"]
        for i in range(self.num_layers):
            names += self.layer_tensor_names(i)
        names.append("model.norm.weight")
        if not self.tie_word_embeddings:
            names.append("lm_head.weight")
        return names


def supported() -> str:
    return ", ".join(ARCHES)


def read_config(model_dir: Path) -> ModelConfig:
    """Parse and validate ``config.json``; raise a one-line :class:`QCompileError` on anything unsupported."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise QCompileError(f"{model_dir}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QCompileError(f"{path}: unreadable config.json ({e})") from None
    names = raw.get("architectures") or []
    arch = ARCHES.get(names[0]) if names else _BY_MODEL_TYPE.get(raw.get("model_type", ""))
    if arch is None:
        what = names[0] if names else raw.get("model_type", "unknown")
        raise QCompileError(f"{model_dir}: unsupported architecture {what!r}; supported: {supported()}")
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        rope = raw.get("rope_parameters") or {}
        scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type"))
        return ModelConfig(
            arch=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise QCompileError(f"{path}: missing or invalid hyper-parameter {e}") from None
