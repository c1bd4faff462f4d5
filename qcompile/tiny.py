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


def build_model(out: Path, arch: str = "qwen2", vocab_size: int = MODEL_VOCAB, seed: int = 0, **overrides) -> None:
    """Save a seeded random ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` (bf16 safetensors) into ``out``.

    Norm weights and biases are randomised too, so every tensor influences the logits.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[arch]
    cfg = config_cls(**{**TINY_CONFIG, "vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": None,
                        "torch_dtype": "bfloat16", **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.6 / p.shape[-1] ** 0.5))
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


def build_variant(name: str, out: Path) -> Path:
    """Build the tiny variant ``name`` (:data:`VARIANTS`) into the empty or new folder ``out``."""
    arch, overrides, seed = VARIANTS[name]
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
