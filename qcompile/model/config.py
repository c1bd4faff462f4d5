"""A checkpoint's hyper-parameters, normalised from config.json, with its architecture's description.

Name questions (which tensors, which linears, HF -> GGUF) are answered by ``cfg.arch``
(:mod:`qcompile.model.architectures`); the helpers here only add this model's layer count and tying.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompile.errors import QCompileError
from qcompile.model.architectures import Architecture, lookup


@dataclass(frozen=True)
class ModelConfig:
    """The hyper-parameters every stage needs, normalised from config.json (transformers 4.x or 5.x)."""
    arch: Architecture
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
    # mixture of experts (0 for a dense model): routed experts, experts per token, an expert's and the
    # shared expert's feed-forward width
    num_experts: int = 0
    num_experts_used: int = 0
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0

    @property
    def mtp_layers(self) -> int:
        """Multi-token-prediction layers carried into the GGUF after the decoder's (llama.cpp's nextn layers)."""
        return self.arch.mtp_count

    @property
    def name_map(self) -> dict[str, str]:
        """HF tensor name -> GGUF tensor name for every tensor this model may contain."""
        return self.arch.gguf_names(self.num_layers)

    def layer_tensor_names(self, i: int) -> list[str]:
        """HF names of layer i's tensors that this architecture has."""
        return self.arch.layer_tensor_names(i)

    def linear_names(self, i: int) -> list[str]:
        """HF weight names of layer i's linears."""
        return self.arch.linear_names(i)

    def decoder_linears(self) -> list[str]:
        """HF weight names of every decoder linear, layer by layer."""
        return [n for i in range(self.num_layers) for n in self.linear_names(i)]

    def expert_tensors(self) -> list[str]:
        """HF names of every stacked routed-expert tensor [E, rows, cols], layer by layer (none when dense)."""
        return [n for i in range(self.num_layers) for n in self.arch.expert_names(i)] if self.arch.moe else []

    @property
    def embed_name(self) -> str:
        return self.arch.EMBED

    @property
    def head_name(self) -> str:
        """The output matrix's name (what a quantized head is called, tied or not)."""
        return self.arch.HEAD

    @property
    def head_source(self) -> str:
        """The checkpoint tensor the output matrix is read from: the embeddings when tied."""
        return self.arch.head_source(self.tie_word_embeddings)

    def expected_tensor_names(self) -> list[str]:
        """Every HF tensor name the checkpoint must provide, in export order."""
        names = [self.arch.EMBED]
        for i in range(self.num_layers):
            names += self.layer_tensor_names(i)
        names += self.arch.mtp_tensor_names()
        names.append(self.arch.FINAL_NORM)
        if not self.tie_word_embeddings:
            names.append(self.arch.HEAD)
        return names


def read_config(model_dir: Path, mtp: bool = True) -> ModelConfig:
    """Parse and validate ``config.json``; raise a one-line :class:`QCompileError` on anything unsupported.

    ``mtp``: carry a hybrid checkpoint's multi-token-prediction layers (as many as it stores, ``mtp.layers.{j}``;
    a checkpoint saved by transformers has none) into the GGUF, as llama.cpp's converter does; False drops them
    (``--no-mtp``)."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise QCompileError(f"{model_dir}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QCompileError(f"{path}: unreadable config.json ({e})") from None
    arch = lookup(raw, model_dir)
    if isinstance(raw.get("text_config"), dict) and "num_hidden_layers" not in raw:
        # a multimodal checkpoint: the decoder's hyper-parameters are its text_config; the output matrix is tied
        # or not by the top level (transformers' *ForConditionalGeneration)
        raw = {**raw["text_config"], "tie_word_embeddings": raw.get("tie_word_embeddings",
                                                                  raw["text_config"].get("tie_word_embeddings", False))}
    try:
        arch = arch.bind(raw)
        if arch.hybrid and mtp:
            from qcompile.model.checkpoint import stored_names, unprefixed_mtp
            arch = arch.with_mtp(_mtp_layers([unprefixed_mtp(n) or n for n in stored_names(model_dir)]))
        moe = _moe_fields(raw, arch, path) if arch.moe else {}
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
            intermediate_size=int(raw["intermediate_size"] if not arch.moe else raw.get("intermediate_size") or 0),
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
            **moe,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise QCompileError(f"{path}: missing or invalid hyper-parameter {e}") from None


def _mtp_layers(names: list[str]) -> int:
    """How many multi-token-prediction layers a checkpoint stores (``mtp.layers.{j}.``)."""
    found = {int(p[2]) for n in names if (p := n.split(".", 3))[0] == "mtp"
             and len(p) > 2 and p[1] == "layers" and p[2].isdigit()}
    return max(found) + 1 if found else 0


def _moe_fields(raw: dict[str, Any], arch, path: Path) -> dict[str, int]:
    """The expert hyper-parameters of an MoE config, refusing what llama.cpp's graph for the family cannot
    express (every layer sparse, its own top-k weighting), rather than writing a file that runs wrong."""
    # released configs say num_experts; transformers 5 saves num_local_experts for qwen3_moe
    n = int(raw["num_experts"] if "num_experts" in raw else raw["num_local_experts"])
    used = int(raw["num_experts_per_tok"])
    if not 0 < used <= n:
        raise QCompileError(f"{path}: num_experts_per_tok {used} is not within 1..num_experts ({n})")
    if int(raw.get("decoder_sparse_step", 1)) != 1 or raw.get("mlp_only_layers"):
        raise QCompileError(f"{path}: dense layers between the MoE layers (decoder_sparse_step "
                            f"{raw.get('decoder_sparse_step', 1)}, mlp_only_layers {raw.get('mlp_only_layers')}) "
                            f"are not supported: llama.cpp's {arch.gguf_arch} makes every layer an MoE layer")
    norm = bool(raw.get("norm_topk_prob", arch.norm_topk_prob))
    if norm != arch.norm_topk_prob:
        raise QCompileError(f"{path}: norm_topk_prob {str(norm).lower()} is not supported: llama.cpp's "
                            f"{arch.gguf_arch} {'always' if arch.norm_topk_prob else 'never'} renormalises the "
                            "top-k expert weights")
    return dict(num_experts=n, num_experts_used=used, expert_intermediate_size=int(raw["moe_intermediate_size"]),
                shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0)
                if arch.shared_expert else 0)
