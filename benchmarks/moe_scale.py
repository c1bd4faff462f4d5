"""RTN of a Qwen3-30B-A3B-shaped MoE checkpoint: qcompile vs llama.cpp's convert_hf_to_gguf.py + llama-quantize,
wall time and peak RSS (issue 16, acceptance 4's memory and time line).

The checkpoint is synthetic (random bf16 weights, Qwen-like magnitudes; time and memory scale with the shapes,
not the values) with Qwen3-30B-A3B's published config.json (hidden 2048, 128 experts of width 768, top-8,
32 query / 4 KV heads of 128, q/k norms, vocabulary 151936, untied), one tensor per expert as the release
ships them, cut to ``--layers`` decoder layers (default 2 of 48: every layer is the same size, so the
per-layer figures carry; the cut is printed in the table). The real Qwen2.5 tokenizer (the converter only
knows real ones). Both sides write Q4_K_M; qcompile with ``--no-verify`` (the peer verifies nothing).

    python benchmarks/moe_scale.py [--layers 2] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import synthetic
from _tools import commit, machine, measure, table, tools

# Qwen/Qwen3-30B-A3B config.json (the fields that shape the tensors, and those llama.cpp reads)
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
    moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=48, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, vocab_size=151936, tie_word_embeddings=False, hidden_act="silu",
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, torch_dtype="bfloat16",
    bos_token_id=151643, eos_token_id=151645, attention_bias=False, attention_dropout=0.0,
    use_sliding_window=False)


def layer_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, hd, e, i = c["hidden_size"], c["head_dim"], c["num_experts"], c["moe_intermediate_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
           "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
           "self_attn.o_proj.weight": (h, q), "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
           "mlp.gate.weight": (e, h)}
    for x in range(e):
        out |= {f"mlp.experts.{x}.gate_proj.weight": (i, h), f"mlp.experts.{x}.up_proj.weight": (i, h),
                f"mlp.experts.{x}.down_proj.weight": (h, i)}
    return out


def build(out: Path, layers: int, seed: int = 0) -> Path:
    """The synthetic checkpoint (one shard per layer, one for the embeddings and head), unless complete."""
    cfg = {**QWEN3_30B_A3B, "num_hidden_layers": layers}
    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text()) == cfg:
        return out
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    shards = [("model-top.safetensors", {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
                                         "lm_head.weight": (v, h)})]
    shards += [(f"model-layer-{i:03d}.safetensors", {f"model.layers.{i}.{k}": s for k, s in layer_shapes(cfg).items()})
               for i in range(layers)]
    return synthetic.write(out, cfg, shards, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers kept of the 48 (default 2)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile-bench" / "moe-scale")
    args = ap.parse_args()
    t = tools()
    model = build(args.work / f"qwen3-30b-a3b-synthetic-{args.layers}L", args.layers)
    out = args.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    f16, peer_q = out / "peer-f16.gguf", out / "peer-Q4_K_M.gguf"
    convert = measure([sys.executable, t["convert"], model, "--outtype", "f16", "--outfile", f16])
    quant = measure([t["quantize"], f16, peer_q, "Q4_K_M", str(os.cpu_count())])
    ours = measure(["qcompile", model, "--quant", "Q4_K_M", "--method", "rtn", "--out", out, "--no-verify", "-q"])
    mine = next(out.glob("*-Q4_K_M.gguf"))
    peer_s, peer_rss = convert.seconds + quant.seconds, max(convert.peak_rss_mb, quant.peak_rss_mb)
    print(f"Qwen3-30B-A3B-shaped synthetic checkpoint, {args.layers} of 48 layers ({model}); {machine()}; "
          f"llama.cpp convert {convert.seconds:.0f} s / {convert.peak_rss_mb:.0f} MB, quantize {quant.seconds:.0f} s / "
          f"{quant.peak_rss_mb:.0f} MB")
    print(table(["row", "commit", "wall s", "peak RSS MB", "MiB", "wall / peer", "RSS / peer"], [
        ["llama.cpp convert_hf_to_gguf f16 + llama-quantize Q4_K_M", "peer", f"{peer_s:.0f}", f"{peer_rss:.0f}",
         f"{peer_q.stat().st_size / 2**20:.0f}", "1.00", "1.00"],
        ["qcompile --quant Q4_K_M --method rtn --no-verify", commit(), f"{ours.seconds:.0f}",
         f"{ours.peak_rss_mb:.0f}", f"{mine.stat().st_size / 2**20:.0f}", f"{ours.seconds / peer_s:.2f}",
         f"{ours.peak_rss_mb / peer_rss:.2f}"]]))


if __name__ == "__main__":
    main()
