#!/usr/bin/env python3
"""Logit agreement of our GGUFs in llama.cpp with transformers, on the tiny test checkpoints.

Prints, per architecture and type, the relative logit error of llama.cpp running our GGUF vs the
transformers model, and for Q4_K_M the same for llama.cpp's own quantizer applied to our F16 GGUF. The dense
variants, then (when this transformers has them) the linear-attention hybrids: Qwen3.5 dense, with tiled value
heads, MoE, and Qwen3-Next.

    python benchmarks/agreement.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import transformers
from _tools import hf_logits, rel_error, table
from gguf import LlamaFileType as F

from qcompile import llama_worker, tiny
from qcompile.cli import main as qcompile


def main() -> None:
    tokens = list(range(3, 700, 11))[:64]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hybrids = list(tiny.HYBRID_VARIANTS) if hasattr(transformers, "Qwen3_5ForCausalLM") else []
        for name in [*tiny.VARIANTS, *hybrids]:
            d = tiny.build_variant(name, Path(tmp) / name)
            ref = hf_logits(d, tokens)
            errs = {}
            for q in ("F32", "F16", "Q8_0", "Q4_K_M"):
                assert qcompile([str(d), "--quant", q, "--out", str(d / "out"), "-q", "--no-verify"]) == 0
                gguf = next((d / "out").glob(f"*-{q}.gguf"))
                errs[q] = rel_error(llama_worker.logits(gguf, tokens), ref)
            theirs = d / "out" / "llama-quantize-Q4_K_M.gguf"
            llama_worker.quantize(next((d / "out").glob("*-F16.gguf")), theirs, F.MOSTLY_Q4_K_M)
            e_theirs = rel_error(llama_worker.logits(theirs, tokens), ref)
            rows.append([name, *(f"{errs[q]:.2e}" for q in ("F32", "F16", "Q8_0", "Q4_K_M")), f"{e_theirs:.2e}",
                         f"{errs['Q4_K_M'] / e_theirs:.3f}"])
    print(table(["model", "F32", "F16", "Q8_0", "Q4_K_M (ours)", "Q4_K_M (llama-quantize)", "ratio"], rows))


if __name__ == "__main__":
    main()
