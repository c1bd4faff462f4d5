#!/usr/bin/env python3
"""Quality per byte: qcompile's methods vs llama.cpp's own quantizer, scored by llama.cpp.

Real Qwen2.5-Coder-0.5B-Instruct (../shared/tools/real_qwen.py). Calibration text: the first part of
each ../shared/corpora file; evaluation text: from the middle of each (never used for calibration).
Baseline: llama.cpp's convert_hf_to_gguf.py F16. Peers: llama-quantize without and with --imatrix
(llama-imatrix on the same calibration text). Every file is scored by ``llama-perplexity
--kl-divergence`` (mean KLD, PPL, top-1 "same top p").

    python benchmarks/quality.py [--types Q4_K_M Q4_0] [--methods rtn imatrix gptq] [--samples 128]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tools import SHARED, measure, table, tools  # noqa: E402
from kld_bench import REAL, eval_text, f16_baseline, real_model  # noqa: E402


def calib_text(work: Path) -> Path:
    p = work / "calib.txt"
    parts = []
    for name in ("brown.txt", "python-docs.txt"):
        t = (SHARED / "corpora" / name).read_text(encoding="utf-8", errors="replace")
        parts.append(t[: len(t) // 3])  # the eval slices start at the middle
    p.write_text("\n\n".join(parts))
    return p


def score(perplexity: Path, model: Path, base: Path, text: Path, ctx: int, chunks: int) -> dict:
    r = measure([perplexity, "-m", model, "-f", text, "-c", ctx, "--chunks", chunks, "--kl-divergence-base", base,
                 "--kl-divergence", "-t", os.cpu_count()])
    grab = lambda pat: float(re.search(pat, r.output).group(1))
    return {"kld": grab(r"Mean\s+KLD:\s+([-0-9.]+)"), "ppl": grab(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)"),
            "top1": grab(r"Same top p:\s+([0-9.]+)")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REAL)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile-bench" / "quality")
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q4_0"])
    ap.add_argument("--methods", nargs="+", default=["rtn", "imatrix", "gptq"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=6)
    args = ap.parse_args()
    t = tools()
    model = real_model(args.model)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    text, calib = eval_text(work), calib_text(work)
    f16, base = f16_baseline(t, model, work, text, args.ctx, args.chunks)
    imatrix, im_time = work / f"imatrix-{args.samples}x{args.seqlen}.gguf", work / "imatrix.seconds"
    if not imatrix.exists():  # computed once per calibration setting, reused across runs
        im = measure([t["imatrix"], "-m", f16, "-f", calib, "-o", imatrix, "-c", args.seqlen, "--chunks",
                      args.samples, "-t", os.cpu_count()])
        im_time.write_text(f"{im.seconds}")
    rows = []
    for typ in args.types:
        for label, extra, secs in (("llama-quantize", [], 0.0), ("llama-quantize --imatrix", ["--imatrix", imatrix],
                                                                   float(im_time.read_text()))):
            out = work / f"peer-{typ}{'-imatrix' if extra else ''}.gguf"
            q = measure([t["quantize"], *extra, f16, out, typ, os.cpu_count()])
            s = score(t["perplexity"], out, base, text, args.ctx, args.chunks)
            rows.append((typ, label, out.stat().st_size, s, secs + q.seconds))
        for method in args.methods:
            out_dir = work / f"qcompile-{method}"
            r = measure(["qcompile", model, "--to", "gguf", "--quant", typ, "--method", method, "--calib", calib,
                         "--calib-samples", args.samples, "--calib-seqlen", args.seqlen, "--out", out_dir, "--force",
                         "-q", "--no-verify"])
            out = out_dir / f"{model.name}-{typ}.gguf"
            s = score(t["perplexity"], out, base, text, args.ctx, args.chunks)
            rows.append((typ, f"qcompile {method}", out.stat().st_size, s, r.seconds))
    ref = {typ: next(k for ty, lab, _, k, _ in rows if ty == typ and lab == "llama-quantize --imatrix")["kld"]
           for typ in args.types}
    print(f"model {model.name}; calibration {args.samples} x {args.seqlen} tokens of {calib.name}; "
          f"eval {args.chunks} x {args.ctx} tokens (held out); KLD vs convert_hf_to_gguf F16")
    print(table(["type", "method", "size MiB", "PPL", "mean KLD", "top-1 %", "KLD / llama.cpp-imatrix", "time s"],
                [[ty, lab, f"{size / 2**20:.1f}", f"{s['ppl']:.3f}", f"{s['kld']:.5f}", f"{s['top1']:.2f}",
                  f"{s['kld'] / ref[ty]:.2f}", f"{secs:.0f}"] for ty, lab, size, s, secs in rows]))


if __name__ == "__main__":
    main()
