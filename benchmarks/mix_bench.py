#!/usr/bin/env python3
"""``--max-size``: per-tensor types chosen by sensitivity vs llama.cpp's Q4_K_M mix at the same size.

Real Qwen2.5-Coder-0.5B-Instruct (../shared/tools/real_qwen.py). Rows: ``llama-quantize Q4_K_M`` (the
peer; its file size is the budget S), our plain ``--quant Q4_K_M`` and our ``--max-size S``, per method
(``rtn``; ``imatrix`` with ``--methods rtn imatrix``). Everything is scored by llama.cpp itself,
``llama-perplexity --kl-divergence`` against convert_hf_to_gguf's F16 on quality.py's held-out text
(the F16 and its logits are reused from quality.py's work folder when they are there). Calibration:
quality.py's calibration text (never the evaluation text); the sensitivity analysis reads its first 16 x
512 tokens.

Each finished row is cached under ``--work``/results (keyed by the exact command), so runs can be split.

    python benchmarks/mix_bench.py [--methods rtn imatrix] [--samples 128] [--seqlen 512]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tools import commit, measure, table, tools  # noqa: E402
from kld_bench import REAL, eval_text, f16_baseline, real_model  # noqa: E402
from quality import calib_text, llama_score  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path.home() / ".cache" / "qcompile-bench"


def baseline(t: dict, model: Path, work: Path, text: Path, ctx: int, chunks: int, reuse: Path) -> tuple[Path, Path]:
    """convert_hf_to_gguf's F16 and its saved logits on ``text``: quality.py's, when it scored the same text
    with the same windows, else made here."""
    f16, base = reuse / "convert-F16.gguf", reuse / "f16.kld"
    same_text = (reuse / "eval.txt").is_file() and (reuse / "eval.txt").read_bytes() == text.read_bytes()
    if same_text and f16.is_file() and base.is_file() and ctx == 512 and chunks == 6:  # quality.py's defaults
        return f16, base
    return f16_baseline(t, model, work, text, ctx, chunks)


def qcompile(args: list) -> list[str]:
    """This checkout's qcompile (not whichever one an installed ``qcompile`` script imports)."""
    return [sys.executable, "-m", "qcompile", *map(str, args)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REAL)
    ap.add_argument("--work", type=Path, default=BENCH / "mix")
    ap.add_argument("--reuse", type=Path, default=BENCH / "quality2", help="quality.py's work folder (F16, logits)")
    ap.add_argument("--methods", nargs="+", default=["rtn"])
    ap.add_argument("--samples", type=int, default=128, help="calibration samples for calibrated methods")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=6)
    args = ap.parse_args()
    t = tools()
    model = real_model(args.model)
    work = args.work
    (work / "results").mkdir(parents=True, exist_ok=True)
    text, calib = eval_text(work), calib_text(work)
    f16, base = baseline(t, model, work, text, args.ctx, args.chunks, args.reuse)
    env = {"PYTHONPATH": str(ROOT)}
    code, llama = commit(), "llama.cpp " + t["quantize"].parents[2].name

    def cached(key: str, cmd: list[str], artifact, run) -> dict:
        """The row for ``key``: from results/ when the same command made it, else run and score it."""
        p = work / "results" / f"{key}.json"
        # the same command from the same code (a clean commit; a dirty tree is never reused) on the same text
        ident = {"command": cmd, "code": code if cmd[0] != str(t["quantize"]) else llama,
                 "eval": hashlib.sha256(text.read_bytes()).hexdigest(), "ctx": args.ctx, "chunks": args.chunks}
        if p.exists() and not code.endswith("+dirty") and \
                {k: json.loads(p.read_text()).get(k) for k in ident} == ident:
            return json.loads(p.read_text())
        seconds = run()
        path = artifact()
        row = {"key": key, **ident, "path": str(path), "bytes": path.stat().st_size, "seconds": seconds,
               "llama": llama_score(t["perplexity"], path, base, text, args.ctx, args.chunks)}
        rep = path.parent / "report.json"
        if rep.is_file():
            r = json.loads(rep.read_text())
            row["report"] = {k: r[k] for k in ("allocation", "tensor_types", "model", "timings_s") if k in r}
        p.write_text(json.dumps(row, indent=1))
        return row

    peer_path = work / "llama-quantize-Q4_K_M.gguf"
    peer_cmd = [str(t["quantize"]), str(f16), str(peer_path), "Q4_K_M", str(os.cpu_count())]
    rows = [("llama-quantize", "Q4_K_M", cached("peer-Q4_K_M", peer_cmd, lambda: peer_path,
                                                 lambda: measure(peer_cmd).seconds))]
    budget = rows[0][2]["bytes"]
    for method in args.methods:
        calib_args = [] if method == "rtn" else ["--calib", calib, "--calib-samples", args.samples,
                                                 "--calib-seqlen", args.seqlen]
        # rtn reads calibration text only for the sensitivity analysis, which uses 16 windows
        sens_args = calib_args or ["--calib", calib, "--calib-samples", 16, "--calib-seqlen", args.seqlen]
        for label, tag, extra in (("Q4_K_M", "Q4_K_M", ["--quant", "Q4_K_M", *calib_args]),
                                  (f"--max-size {budget}", f"max{budget}", ["--max-size", budget, *sens_args])):
            out = work / f"qcompile-{method}-{tag}"
            cmd = qcompile([model, "--to", "gguf", *extra, "--method", method, "--out", out, "--force",
                            "--no-verify", "-q"])

            def run(cmd=cmd, out=out) -> float:
                shutil.rmtree(out, ignore_errors=True)
                return measure(cmd, env=env).seconds
            rows.append((f"qcompile {method}", label,
                         cached(f"{method}-{tag}", cmd, lambda out=out: next(out.glob("*.gguf")), run)))
    plain = {tool: r["llama"]["kld"] for tool, label, r in rows if label == "Q4_K_M" and tool.startswith("qcompile")}
    n_params = next(r["report"]["model"]["parameters"] for _, _, r in rows if "report" in r)
    print(f"model {model.name}; budget S = {budget} bytes (llama-quantize Q4_K_M); eval {args.chunks} x {args.ctx} "
          f"tokens of {text} (held out), llama-perplexity --kl-divergence vs convert_hf_to_gguf F16; calibration "
          f"{calib}")
    fmt_pred = lambda r: "-" if "report" not in r or "allocation" not in r["report"] else \
        f"{r['report']['allocation']['predicted_kld']:.5f} (Q4_K_M: {r['report']['allocation']['base_predicted_kld']:.5f})"
    print(table(["tool", "types", "code", "bytes", "MiB", "bpw", "KLD", "PPL", "top-1 %", "KLD / our Q4_K_M",
                 "predicted KLD", "time s"],
                [[tool, label, r["code"], r["bytes"], f"{r['bytes'] / 2**20:.1f}", f"{8 * r['bytes'] / n_params:.3f}",
                  f"{r['llama']['kld']:.5f}", f"{r['llama']['ppl']:.3f}", f"{r['llama']['top1']:.2f}",
                  f"{r['llama']['kld'] / plain[tool]:.3f}" if tool in plain else "-",
                  fmt_pred(r), f"{r['seconds']:.0f}"] for tool, label, r in rows]))
    for tool, label, r in rows:
        if "report" in r and "allocation" in r["report"]:
            print(f"{tool} {label}: tensor types {r['report']['tensor_types']}")


if __name__ == "__main__":
    main()
