"""``qcompile tiny``: a small Qwen2.5-architecture checkpoint built locally and deterministically.

It lets the whole pipeline run with no download: a byte-level BPE tokenizer trained on the packaged
text with Qwen2's pre-tokenizer regex and ChatML special tokens, and a randomly initialised (seeded)
Qwen2 model with tied embeddings and every row length a multiple of 256, so K-quants apply.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

QWEN2_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
          "{%- endif %}")
VERSION = "v1"
BPE_VOCAB = 768
MODEL_VOCAB = 832  # padded beyond the tokenizer, as Qwen does (151665 tokens, 151936 rows)


def default_dir() -> Path:
    root = Path(os.environ.get("QCOMPILE_CACHE", Path.home() / ".cache" / "qcompile"))
    return root / f"tiny-qwen2.5-{VERSION}"


def builtin_text() -> str:
    return resources.files("qcompile.data").joinpath("eval.txt").read_text(encoding="utf-8")


def build_tokenizer(out: Path) -> None:
    """Train and save a Qwen2-style byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = builtin_text()
    tok.train_from_iterator([text] * 2, trainer=trainer)
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    first = tok.token_to_id(SPECIALS[0])
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(first + i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                                  "single_word": False, "special": True}
                                 for i, s in enumerate(SPECIALS)},
        "additional_special_tokens": SPECIALS, "bos_token": None, "chat_template": CHATML,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 4096, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


TINY_CONFIG = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6,
                   tie_word_embeddings=True)


def randomize(model, seed: int, zero_centred: bool = False) -> None:
    """Seeded random weights for every parameter of ``model``, so every tensor influences the logits.

    Norm weights near 1 (near 0 where the family's norms are zero-centred, x * (1 + w), as Qwen3.5's checkpoints
    hold them, except its linear attention's gated norm x * w and the vision tower's LayerNorms); other vectors
    near 0; matrices scaled by their input width; MoE routers with clear preferences."""
    import torch
    routers = [m.weight for m in model.modules() if type(m).__name__.endswith("Router")]  # MoE top-k routers
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                one = "norm" in name and (not zero_centred or "linear_attn.norm" in name or "visual" in name)
                p.copy_((1.0 if one else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif any(p is r for r in routers):
                # an MoE router with clear preferences: top-k choices that a last-bit difference between two
                # runtimes does not flip (a flip swaps a whole expert's output for a token)
                p.copy_(torch.randn(p.shape, generator=g) * (8.0 / p.shape[-1] ** 0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.6 / p.shape[-1] ** 0.5))


def build_model(out: Path, arch: str = "qwen2", vocab_size: int = MODEL_VOCAB, seed: int = 0, **overrides) -> None:
    """Save a seeded random ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` (or the ``qwen2_moe`` / ``qwen3_moe``
    MoE models) (bf16 safetensors) into ``out``.

    Norm weights and biases are randomised too, so every tensor influences the logits.
    """
    import torch
    import transformers
    from transformers import GenerationConfig

    classes = {"qwen2": "Qwen2", "qwen3": "Qwen3", "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe",
               "qwen3_5": "Qwen3_5", "qwen3_5_moe": "Qwen3_5Moe", "qwen3_next": "Qwen3Next"}[arch]
    # Qwen3.5's causal-LM classes take the text config (the top-level config is the multimodal one)
    config_cls = getattr(transformers, f"{classes}TextConfig" if arch.startswith("qwen3_5") else f"{classes}Config")
    model_cls = getattr(transformers, f"{classes}ForCausalLM")
    cfg = config_cls(**{**TINY_CONFIG, "vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": None,
                        "torch_dtype": "bfloat16", **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg)
    randomize(model, seed, zero_centred=arch.startswith(("qwen3_5", "qwen3_next")))
    model.generation_config = GenerationConfig()
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)


# The tiny variants the test suite and the benchmarks compile, one per layout difference: name ->
# (architecture, config overrides, seed). qwen2: untied head, q/k/v bias; qwen2.5: tied; qwen3: q/k norms and a
# head_dim that is not hidden / heads.
VARIANTS: dict[str, tuple[str, dict, int]] = {
    "qwen2": ("qwen2", dict(tie_word_embeddings=False), 10),
    "qwen2.5": ("qwen2", dict(tie_word_embeddings=True), 11),
    "qwen3": ("qwen3", dict(tie_word_embeddings=False, head_dim=128), 12),
}


# Mixture-of-experts variants (kept apart: ONNX, OpenVINO and the calibrated methods do not take them yet).
# qwen2-moe: 8 experts (llama.cpp's 8-expert type rules fire), top-2, a shared expert behind its sigmoid gate,
# top-k weights not renormalised; qwen3-moe: 6 experts, top-2, renormalised, q/k norms. Rows of 256.
MOE_VARIANTS: dict[str, tuple[str, dict, int]] = {
    "qwen2-moe": ("qwen2_moe", dict(tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=256, shared_expert_intermediate_size=512,
                                    norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[]), 13),
    "qwen3-moe": ("qwen3_moe", dict(tie_word_embeddings=False, head_dim=128, num_experts=6, num_experts_per_tok=2,
                                    moe_intermediate_size=256, norm_topk_prob=True, decoder_sparse_step=1,
                                    mlp_only_layers=[]), 14),
}


# Linear-attention hybrids (Qwen3.5: three Gated DeltaNet layers, then a gated full-attention layer). qwen3.5: as many
# value heads as key heads (llama.cpp stores every tensor as transformers does, so calibrated methods apply);
# qwen3.5-tiled: twice as many value heads (llama.cpp's converter tiles them: rows and out_proj's columns reordered);
# qwen3.5-moe: 4 experts, top-2, a shared expert. head_dim 64 (q_proj: query and gate, 512 rows), rows of 256.
_LINEAR = dict(linear_conv_kernel_dim=4, linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=4,
               linear_num_value_heads=4, head_dim=64, full_attention_interval=4, tie_word_embeddings=False)
HYBRID_VARIANTS: dict[str, tuple[str, dict, int]] = {
    "qwen3.5": ("qwen3_5", _LINEAR, 15),
    "qwen3.5-tiled": ("qwen3_5", {**_LINEAR, "linear_num_key_heads": 2, "linear_num_value_heads": 4}, 16),
    "qwen3.5-moe": ("qwen3_5_moe", {**_LINEAR, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 256, "shared_expert_intermediate_size": 256}, 17),
    # Qwen3-Next: the MoE hybrid with fused in_proj_qkvz / in_proj_ba; two value heads per key head, so the fused
    # rows interleave per key head (q, k, v v, z z) and in_proj_ba's (b b, a a)
    "qwen3-next": ("qwen3_next", {**_LINEAR, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                                  "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
                                  "shared_expert_intermediate_size": 256, "decoder_sparse_step": 1,
                                  "mlp_only_layers": []}, 18),
}


def build_multimodal(out: Path, name: str = "qwen3.5", vocab_size: int = MODEL_VOCAB, **text_overrides) -> None:
    """A seeded random multimodal Qwen3.5 (``Qwen3_5ForConditionalGeneration`` / the MoE one): the hybrid variant
    ``name``'s text model (``model.language_model.``, ``text_config``) with a two-block vision tower
    (``model.visual.``), saved as the releases are; a tokenizer is the caller's."""
    import torch
    import transformers
    arch, overrides, seed = HYBRID_VARIANTS[name]
    prefix = {"qwen3_5": "Qwen3_5", "qwen3_5_moe": "Qwen3_5Moe"}[arch]
    text = {**TINY_CONFIG, "vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": None, **overrides,
            **text_overrides}
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=text["hidden_size"], num_position_embeddings=64)
    cfg = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision,
                                                   tie_word_embeddings=text["tie_word_embeddings"])
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(cfg)
    randomize(model, seed, zero_centred=True)
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)


def build_variant(name: str, out: Path) -> Path:
    """Build the tiny variant ``name`` (:data:`VARIANTS` or :data:`MOE_VARIANTS`) into the empty or new
    folder ``out``."""
    arch, overrides, seed = {**VARIANTS, **MOE_VARIANTS, **HYBRID_VARIANTS}[name]
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    build_model(out, arch=arch, seed=seed, **overrides)
    return out


def build(out: Path | None = None) -> Path:
    """Build the tiny checkpoint into ``out`` (default: the qcompile cache) unless already there."""
    out = out or default_dir()
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    try:
        build_tokenizer(tmp)
        build_model(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out
