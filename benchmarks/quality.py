#!/usr/bin/env python3
"""Quality per byte, fairly: qcompile's methods vs llama.cpp's quantizer on the same calibration windows,
scored by llama.cpp on in-domain held-out text and on held-out sets of other domains.

Real Qwen2.5-Coder-0.5B-Instruct as ../shared/tools/real_qwen.py builds it (a dequantized Q4_K_M release
with function-preserving channel rescaling: PPLs are that checkpoint's, not Qwen's published model's).

* Calibration: ``calib.txt`` (the first third of each ../shared/corpora file). qcompile takes its
  ``--samples`` x ``--seqlen`` seeded windows (``--calib FILE``); **the very same windows**, decoded to
  text, are what ``llama-imatrix`` reads (``-c SEQLEN --chunks SAMPLES``; the table header says how many
  tokens re-tokenize identically).
* Rows: ``llama-quantize TYPE``, ``llama-quantize --imatrix TYPE``, and qcompile ``--quant TYPE`` with
  each of ``--methods`` (``rtn``, ``imatrix``, ``gptq``, ``awq``, ``awq+gptq``; ``M --max-size``: method
  M with the byte budget of llama-quantize's TYPE file, so every row is at llama.cpp's size).
* Scores: ``llama-perplexity --kl-divergence`` against convert_hf_to_gguf's F16, ``--chunks`` x ``--ctx``
  tokens of each set: ``in-domain`` (the middle of each corpus, never in calib.txt) and the four unseen
  sets of benchmarks/heldout.py (literature, C code, multilingual, dialogue), whose mean is the headline.

Every row carries the commit its qcompile ran from (a clean export of HEAD by default) and is cached by
everything that changes it (benchmarks/unseen_bench.py does the building, caching and scoring; peers and
ours are timed alike: wall clock of the whole commands, llama.cpp's F16 conversion not counted).

    python benchmarks/quality.py [--type Q4_K_M] [--methods rtn imatrix gptq awq+gptq "gptq --max-size" ...]
                                 [--samples 128] [--seqlen 512] [--qcompile-src head|tree|COMMIT]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tools import SHARED, measure  # noqa: E402
from kld_bench import REAL, eval_text, real_model  # noqa: E402


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


def method_args(method: str, typ: str, calib: Path, samples: int, seqlen: int) -> str:
    """qcompile options for one row: ``M`` (``--quant TYPE --method M``) or ``M --max-size`` (M within the
    byte budget of llama-quantize's TYPE file, ``{peer_bytes}``, filled in by unseen_bench)."""
    m, _, budget = method.partition(" ")
    if budget not in ("", "--max-size"):
        raise SystemExit(f"--methods {method!r}: expected METHOD or 'METHOD --max-size'")
    cal = "" if m == "rtn" and not budget else f" --calib {calib} --calib-samples {samples} --calib-seqlen {seqlen}"
    size = f"--max-size {{peer_bytes}} --quant {typ}" if budget else f"--quant {typ}"
    return f"{size} --method {m}{cal}"


def main(argv: list[str] | None = None) -> None:
    import unseen_bench
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REAL)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile-bench" / "quality")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--methods", nargs="*", default=["rtn", "imatrix", "gptq", "awq+gptq", "gptq --max-size",
                                                      "awq+gptq --max-size"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--qcompile-src", default="head", metavar="head|tree|COMMIT")
    ap.add_argument("--autoround-python", type=Path, metavar="PY",
                    help="python of an environment with auto-round (benchmarks/autoround_peer.py): adds its row")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--autoround-iters", type=int, help="auto-round iterations per block (default: its own)")
    how.add_argument("--autoround-light", action="store_true",
                     help="auto-round's light recipe (iters 50, lr 5e-3): its defaults take hours on 2 cores")
    args = ap.parse_args(argv)
    model = real_model(args.model)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    text = eval_text(work)
    # named by its content: the path is part of each row's cache key, so other text is another row
    raw = calib_text(work)
    calib = work / f"calib-{hashlib.sha256(raw.read_bytes()).hexdigest()[:12]}.txt"
    if not calib.exists():
        calib.write_bytes(raw.read_bytes())
    argv = ["--model", str(model), "--work", str(work / "runs"), "--type", args.type, "--peer-calib", str(calib),
            "--peer-samples", str(args.samples), "--peer-seqlen", str(args.seqlen), "--ctx", str(args.ctx),
            "--chunks", str(args.chunks), "--text", f"in-domain={text}", "--qcompile-src", args.qcompile_src]
    for m in args.methods:
        argv += ["--ours", f"{m}:{method_args(m, args.type, calib, args.samples, args.seqlen)}"]
    if args.autoround_python:
        argv += ["--external", autoround_row(args, model, calib, work)]
    unseen_bench.main(argv)


def autoround_row(args, model: Path, calib: Path, work: Path) -> str:
    """unseen_bench's ``--external`` spec of the auto-round peer on qcompile's very calibration windows."""
    import subprocess

    import numpy as np

    from calibration.sources import calibration_tokens
    windows = calibration_tokens(str(calib), model, args.samples, args.seqlen, 0)
    npy = work / f"windows-{hashlib.sha256(windows.tobytes()).hexdigest()[:12]}.npy"
    if not npy.exists():
        np.save(npy, windows)
    py = str(args.autoround_python)
    version = subprocess.run([py, "-c", "import auto_round; print(auto_round.__version__)"], check=True,
                             capture_output=True, text=True).stdout.strip()
    fmt = "gguf:" + args.type.lower()
    name = args.type.lower()  # (no ':' in a label: the --external spec is LABEL:VERSION:COMMAND)
    if args.autoround_light:
        how, label = " --light", f"auto-round {name} (its light recipe)"
    elif args.autoround_iters is not None:
        how, label = f" --iters {args.autoround_iters}", f"auto-round {name} iters {args.autoround_iters}"
    else:
        how, label = "", f"auto-round {name} (its defaults)"
    script = Path(__file__).resolve().parent / "autoround_peer.py"
    return f"{label}:auto-round {version}:{py} {script} {model} {npy} {{out}} --format {fmt}{how}"


if __name__ == "__main__":
    main()
