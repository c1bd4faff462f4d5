"""Synthetic Qwen2.5 checkpoints with the real configurations, written one tensor at a time.

For cost measurements only (time and memory scale with the shapes, not with the values): random bf16
weights with Qwen-like magnitudes (rows of a linear have norm ~0.6, norms ~1, small biases), the real
Qwen2.5 tokenizer from ``../shared/assets``. The 7B configuration can be cut to fewer layers
(``layers=``): every per-layer cost is then measured on the layers kept and extrapolated.

Why not transformers' own ``from_config`` + ``save_pretrained``: that materialises the whole model (30 GB
in float32 at 7B); this writer holds one tensor at a time.

    python benchmarks/synthetic.py 1.5B /tmp/synth-1.5B [--layers N]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED / "assets" / "qwen2.5-tokenizer"

# Qwen2.5 base configurations as published (config.json of Qwen/Qwen2.5-{0.5B,1.5B,3B,7B})
CONFIGS: dict[str, dict] = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
COMMON = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
              max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, torch_dtype="bfloat16",
              bos_token_id=151643, eos_token_id=151643, use_sliding_window=False, attention_dropout=0.0)


def _bf16(a: np.ndarray):
    """float32 -> torch bfloat16 by rounding to nearest even on the bit pattern (no float copy in torch)."""
    import torch
    u = a.astype(np.float32).view(np.uint32)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return torch.from_numpy(u.view(np.int16)).view(torch.bfloat16)


def layer_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i = c["hidden_size"], c["intermediate_size"]
    hd = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    return {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h), "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.weight": (kv, h), "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i)}


def _values(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 1:
        base = 1.0 if "norm" in name else 0.0
        return (base + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= 0.6 / np.sqrt(shape[1])
    return w


def build(size: str, out: Path, layers: int | None = None, seed: int = 0) -> Path:
    """Write the synthetic checkpoint of ``size`` (a key of :data:`CONFIGS`) into ``out`` (one safetensors
    shard per layer, plus one for the embeddings/head) unless it is already complete there."""
    cfg = {**COMMON, **CONFIGS[size]}
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    if (out / "config.json").is_file():
        if json.loads((out / "config.json").read_text()) == cfg:
            return out
        shutil.rmtree(out)
    top = {"model.embed_tokens.weight": (cfg["vocab_size"], cfg["hidden_size"]),
           "model.norm.weight": (cfg["hidden_size"],)}
    if not cfg["tie_word_embeddings"]:
        top["lm_head.weight"] = (cfg["vocab_size"], cfg["hidden_size"])
    shards = [("model-top.safetensors", top)] + [
        (f"model-layer-{i:03d}.safetensors", {f"model.layers.{i}.{k}": s for k, s in layer_shapes(cfg).items()})
        for i in range(cfg["num_hidden_layers"])]
    return write(out, cfg, shards, seed)


def write(out: Path, cfg: dict, shards: list[tuple[str, dict[str, tuple[int, ...]]]], seed: int = 0) -> Path:
    """Write a checkpoint of random values: ``shards`` (file name, tensor name -> shape), one tensor of values at
    a time, the index, ``cfg`` as config.json and the real tokenizer, into a temporary folder renamed to
    ``out`` once complete."""
    from safetensors.torch import save_file
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    index: dict[str, str] = {}
    for fname, tensors in shards:
        save_file({n: _bf16(_values(rng, n, s)) for n, s in tensors.items()}, str(tmp / fname),
                  metadata={"format": "pt"})
        index.update({n: fname for n in tensors})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in TOKENIZER.iterdir():
        shutil.copy(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("size", choices=list(CONFIGS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, help="keep only this many decoder layers (default: the real count)")
    a = ap.parse_args(argv)
    print(build(a.size, a.out, a.layers), file=sys.stderr)


if __name__ == "__main__":
    main()
