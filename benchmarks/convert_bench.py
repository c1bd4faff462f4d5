#!/usr/bin/env python3
"""qcompile vs llama.cpp's convert_hf_to_gguf.py + llama-quantize: wall time and peak RSS.

A synthetic Qwen2.5-1.5B-shaped bf16 checkpoint (random weights, the real Qwen2.5 tokenizer from
../shared/assets) is generated once; each tool turns it into Q8_0 and Q4_K_M GGUFs. The peer's time
is convert (HF -> F16 GGUF) plus llama-quantize; its peak RSS is the larger of the two steps.
qcompile runs with --no-verify so both sides do the same work (conversion only).

    python benchmarks/convert_bench.py [--work DIR] [--types Q8_0 Q4_K_M]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tools import SHARED, measure, table, tools  # noqa: E402

SHAPE = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
             num_key_value_heads=2, vocab_size=151936)


def make_checkpoint(d: Path) -> Path:
    """Write the synthetic checkpoint (sharded bf16 safetensors, ~3.1 GB) unless it is already there."""
    if (d / "model.safetensors.index.json").is_file():
        return d
    import torch
    from safetensors.torch import save_file
    tmp = d.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
           "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 151643,
           "eos_token_id": 151645, "use_sliding_window": False, **SHAPE}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHARED / "assets" / "qwen2.5-tokenizer" / f, tmp / f)
    h, ff, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["hidden_size"] // 6
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)
    shards: list[dict] = [{"model.embed_tokens.weight": rnd(SHAPE["vocab_size"], h), "model.norm.weight": rnd(h) + 1}]
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shards.append({p + "input_layernorm.weight": rnd(h) + 1, p + "post_attention_layernorm.weight": rnd(h) + 1,
                       p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.q_proj.bias": rnd(h),
                       p + "self_attn.k_proj.weight": rnd(kv, h), p + "self_attn.k_proj.bias": rnd(kv),
                       p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.v_proj.bias": rnd(kv),
                       p + "self_attn.o_proj.weight": rnd(h, h), p + "mlp.gate_proj.weight": rnd(ff, h),
                       p + "mlp.up_proj.weight": rnd(ff, h), p + "mlp.down_proj.weight": rnd(h, ff)})
    n = len(shards)
    weight_map = {}
    for k, tensors in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    os.replace(tmp, d)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile-bench" / "convert")
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M"])
    args = ap.parse_args()
    t = tools()
    model = make_checkpoint(args.work / "qwen2.5-1.5b-synthetic")
    out = args.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = []
    f16 = out / "peer-f16.gguf"
    convert = measure([sys.executable, t["convert"], model, "--outtype", "f16", "--outfile", f16])
    print(f"convert_hf_to_gguf.py -> F16: {convert.seconds:.1f} s, peak RSS {convert.peak_rss_mb:.0f} MB",
          file=sys.stderr)
    threads = str(os.cpu_count())
    for typ in args.types:
        peer_q = measure([t["quantize"], f16, out / f"peer-{typ}.gguf", typ, threads])
        ours = measure(["qcompile", model, "--to", "gguf", "--quant", typ, "--out", out, "--no-verify", "-q",
                        "--force"])
        peer_s = convert.seconds + peer_q.seconds
        peer_rss = max(convert.peak_rss_mb, peer_q.peak_rss_mb)
        our_file = next(out.glob(f"*-{typ}.gguf"))
        rows.append([typ, f"{peer_s:.1f}", f"{ours.seconds:.1f}", f"{ours.seconds / peer_s:.2f}",
                     f"{peer_rss:.0f}", f"{ours.peak_rss_mb:.0f}", f"{ours.peak_rss_mb / peer_rss:.2f}",
                     f"{(out / f'peer-{typ}.gguf').stat().st_size / 2**20:.0f}", f"{our_file.stat().st_size / 2**20:.0f}"])
    print(table(["type", "peer s (convert+quantize)", "qcompile s", "time ratio", "peer peak RSS MB",
                 "qcompile peak RSS MB", "RSS ratio", "peer MiB", "qcompile MiB"], rows))


if __name__ == "__main__":
    main()
