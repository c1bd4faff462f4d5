#!/usr/bin/env python3
"""Quality per byte: qcompile's methods vs llama.cpp's own quantizer, on the real model.

Real Qwen2.5-Coder-0.5B-Instruct (../shared/tools/real_qwen.py). Calibration text: the first third of
each ../shared/corpora file; evaluation text: from the middle of each (never used for calibration).
Rows: method x type for qcompile (rtn, imatrix, gptq, awq, awq+gptq x Q4_K_M, Q4_0, INT4_G128) and
llama.cpp's ``llama-quantize`` without and with ``--imatrix`` (``llama-imatrix`` on the same
calibration text). Scores:

* **llama.cpp** — ``llama-perplexity --kl-divergence`` against convert_hf_to_gguf's F16 (GGUF rows);
* **PyTorch** — ``qcompile eval --runtime pytorch`` (dequantized weights vs the bf16 checkpoint; the
  only score for INT4_G128, a grid GGUF has no type for: its weights are evaluated in memory).

Each finished row is cached under ``--work``/results, so runs can be split and resumed.

    python benchmarks/quality.py [--types Q4_K_M Q4_0 INT4_G128] [--methods rtn imatrix gptq awq awq+gptq]
                                 [--samples 128] [--seqlen 512]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
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


def llama_score(perplexity: Path, model: Path, base: Path, text: Path, ctx: int, chunks: int) -> dict:
    r = measure([perplexity, "-m", model, "-f", text, "-c", ctx, "--chunks", chunks, "--kl-divergence-base", base,
                 "--kl-divergence", "-t", os.cpu_count()])
    grab = lambda pat: float(re.search(pat, r.output).group(1))
    return {"kld": grab(r"Mean\s+KLD:\s+([-0-9.]+)"), "ppl": grab(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)"),
            "top1": grab(r"Same top p:\s+([0-9.]+)")}


def torch_score(model: Path, artifact: Path, text: Path, ctx: int, tokens: int) -> dict:
    out = artifact.with_suffix(".eval.json")
    measure(["qcompile", "eval", model, "--artifact", artifact, "--text", text, "--ctx", ctx, "--max-tokens", tokens,
             "--runtime", "pytorch", "--json", out, "-q"])
    return json.loads(out.read_text())["results"]["pytorch"]


def int_grid_run(model: Path, typ: str, method: str, calib: Path, samples: int, seqlen: int, text: Path,
                 ctx: int, tokens: int) -> tuple[dict, float, float]:
    """Quantize every decoder linear onto an integer grid in memory (the calibration engine, or RTN) and
    score the dequantized model on the PyTorch path: (metrics, seconds, bits per linear weight)."""
    from calibration.capture import LayerwiseEngine
    from calibration.sources import calibration_tokens
    from qcompile import evaluate
    from qcompile.arch import read_config
    from qcompile.checkpoint import Checkpoint
    from qcompile.pipeline import decoder_linears, quantize_decoder
    from quantizers import QUANTIZERS
    from quantizers.grids import parse_type
    cfg = read_config(model)
    src = evaluate.CheckpointSource(Checkpoint(model, cfg))
    t, m = parse_type(typ), QUANTIZERS[method]
    names = decoder_linears(cfg)
    t0 = time.perf_counter()
    eng = LayerwiseEngine(cfg, src, calibration_tokens(str(calib), model, samples, seqlen, 0), {n: t for n in names},
                          m) if m.needs_calibration else None
    tensors = quantize_decoder(cfg, src, t, eng)
    seconds = time.perf_counter() - t0
    bpw = 8 * sum(tensors[n].nbytes for n in names) / sum(int(src.shape(n)[0] * src.shape(n)[1]) for n in names)
    ids = evaluate.tokenize(model, text.read_text(encoding="utf-8"))
    windows, score = evaluate.make_windows(ids, ctx, tokens)
    metrics, _ = evaluate.reference_eval(cfg, src, evaluate.QuantizedSource(src, tensors), windows, score=score)
    return metrics.as_dict(), seconds, bpw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REAL)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile-bench" / "quality")
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q4_0", "INT4_G128"])
    ap.add_argument("--methods", nargs="+", default=["rtn", "imatrix", "gptq", "awq", "awq+gptq"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--imatrix-samples", type=int, help="llama-imatrix chunks for the peer (default: --samples)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--fresh", action="store_true", help="recompute rows cached from earlier runs")
    ap.add_argument("--llama-only", action="store_true", help="score GGUF rows with llama-perplexity only (skip the "
                                                               "PyTorch path)")
    args = ap.parse_args()
    t = tools()
    model = real_model(args.model)
    work = args.work
    (work / "results").mkdir(parents=True, exist_ok=True)
    text, calib = eval_text(work), calib_text(work)
    tokens = args.ctx * args.chunks
    f16, base = f16_baseline(t, model, work, text, args.ctx, args.chunks)
    im_samples = args.imatrix_samples or args.samples
    imatrix, im_time = work / f"imatrix-{im_samples}x{args.seqlen}.gguf", work / f"imatrix-{im_samples}x{args.seqlen}.seconds"
    calib_tag = f"{args.samples}x{args.seqlen}"

    def cached(key: str, compute) -> dict:
        p = work / "results" / f"{key}.json"
        if p.exists() and not args.fresh:
            return json.loads(p.read_text())
        row = compute()
        p.write_text(json.dumps(row, indent=1))
        return row

    def gguf_row(label: str, path: Path, seconds: float) -> dict:
        return {"label": label, "bytes": path.stat().st_size, "seconds": seconds,
                "llama": llama_score(t["perplexity"], path, base, text, args.ctx, args.chunks),
                "torch": None if args.llama_only else torch_score(model, path, text, args.ctx, tokens)}

    rows = []
    for typ in args.types:
        gguf = not typ.upper().startswith("INT")
        if gguf:
            if not imatrix.exists():  # computed once per calibration setting, reused across runs
                im = measure([t["imatrix"], "-m", f16, "-f", calib, "-o", imatrix, "-c", args.seqlen, "--chunks",
                              im_samples, "-t", os.cpu_count()])
                im_time.write_text(f"{im.seconds}")
            for label, extra in (("llama-quantize", []), ("llama-quantize --imatrix", ["--imatrix", imatrix])):
                def peer(extra=extra, label=label):
                    out = work / f"peer-{typ}{'-imatrix' if extra else ''}.gguf"
                    q = measure([t["quantize"], *extra, f16, out, typ, os.cpu_count()])
                    return gguf_row(label, out, q.seconds + (float(im_time.read_text()) if extra else 0.0))
                rows.append((typ, cached(f"{typ}-peer{f'-imatrix-{im_samples}x{args.seqlen}' if extra else ''}", peer)))
        for method in args.methods:
            def ours(method=method):
                if not gguf:
                    m, secs, bpw = int_grid_run(model, typ, method, calib, args.samples, args.seqlen, text,
                                                args.ctx, tokens)
                    return {"label": f"qcompile {method}", "bytes": None, "bpw_linears": bpw, "seconds": secs,
                            "llama": None, "torch": m}
                out_dir = work / f"qcompile-{method}-{typ}"
                cmd = ["qcompile", model, "--to", "gguf", "--quant", typ, "--method", method, "--calib", calib,
                       "--calib-samples", args.samples, "--calib-seqlen", args.seqlen, "--out", out_dir, "--force",
                       "-q", "--no-verify"]
                artifact = out_dir / f"{model.name}-{typ}.gguf"
                rep = out_dir / "report.json"
                if rep.exists() and json.loads(rep.read_text())["tool"]["command"][1:] == [str(c) for c in cmd[1:]]:
                    seconds = json.loads(rep.read_text())["timings_s"]["total"]  # that very command ran before
                else:
                    seconds = measure(cmd).seconds
                return gguf_row(f"qcompile {method}", artifact, seconds)
            rows.append((typ, cached(f"{typ}-{method}-{calib_tag}", ours)))
    ref = {typ: r["llama"]["kld"] for typ, r in rows if r["label"] == "llama-quantize --imatrix"}
    rtn_torch = {typ: r["torch"]["kld_mean"] for typ, r in rows if r["label"] == "qcompile rtn" and r["torch"]}
    print(f"model {model.name}; calibration {calib_tag} tokens of {calib.name} (llama-imatrix: {im_samples}x"
          f"{args.seqlen}); eval {args.chunks} x {args.ctx} "
          f"tokens (held out). llama.cpp: llama-perplexity --kl-divergence vs convert_hf_to_gguf F16; "
          f"PyTorch: qcompile eval (dequantized weights vs the bf16 checkpoint)")
    fmt = lambda x, f: "-" if x is None else format(x, f)
    print(table(["type", "method", "size MiB", "llama.cpp PPL", "llama.cpp KLD", "top-1 %", "KLD / llama.cpp-imatrix",
                 "PyTorch KLD", "PyTorch KLD / rtn", "time s"],
                [[typ, r["label"], fmt(r["bytes"] and r["bytes"] / 2**20, ".1f") if r["bytes"] else
                  f"({r['bpw_linears']:.2f} b/w linears)",
                  fmt(r["llama"] and r["llama"]["ppl"], ".3f"), fmt(r["llama"] and r["llama"]["kld"], ".5f"),
                  fmt(r["llama"] and r["llama"]["top1"], ".2f"),
                  fmt(r["llama"] and typ in ref and r["llama"]["kld"] / ref[typ], ".2f"),
                  fmt(r["torch"] and r["torch"]["kld_mean"], ".5f"),
                  fmt(rtn_torch.get(typ) and r["torch"] and r["torch"]["kld_mean"] / rtn_torch[typ], ".2f"),
                  f"{r['seconds']:.0f}"] for typ, r in rows]))


if __name__ == "__main__":
    main()
