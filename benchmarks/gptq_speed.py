#!/usr/bin/env python3
"""Calibrated quantization time on the real 0.5B: qcompile GPTQ vs llama.cpp's imatrix + quantize.

Both sides get the same calibration tokens: the ``--samples`` x ``--seqlen`` windows qcompile takes from
``--calib FILE`` (default ../shared/corpora/python-docs.txt, 128 x 512), decoded to a text file that
``llama-imatrix -c SEQLEN --chunks SAMPLES`` reads (``unseen_bench.peer_calib_text``). Rows, each timed
by wall clock as one or more commands, with GNU time's peak RSS:

* ``qcompile gptq`` — ``qcompile MODEL --to gguf --quant Q4_K_M --method gptq --calib FILE
  --calib-samples N --calib-seqlen T --no-verify`` from a clean export of HEAD (its commit in the row),
  with report.json's stage timings;
* ``llama.cpp imatrix + quantize`` — ``llama-imatrix`` on llama.cpp's own F16 of the model, then
  ``llama-quantize --imatrix`` to Q4_K_M (the F16 conversion is timed apart: a user of llama.cpp
  converts once whatever the method);
* ``llama.cpp convert`` — ``convert_hf_to_gguf.py --outtype f16``.

The model is ``../shared/tools/real_qwen.py``'s Qwen2.5-Coder-0.5B-Instruct (dequantized from a Q4_K_M
release, with function-preserving rescaling): real shapes and activations. The 1-minute load average at
the end of each command is printed: above the core count, other work shared the CPU.

    python benchmarks/gptq_speed.py [--samples 128] [--seqlen 512] [--threads N] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tools import SHARED, measure, table, tools  # noqa: E402
from kld_bench import REAL, real_model  # noqa: E402
from unseen_bench import peer_calib_text, qcompile_source  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REAL)
    ap.add_argument("--calib", type=Path, default=SHARED / "corpora" / "python-docs.txt")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile-bench" / "gptq-speed")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = real_model(args.model)
    t = tools()
    src, _key, label, _commit = qcompile_source(args.work, "head")
    text, note = peer_calib_text(args.work, model, args.calib, args.samples, args.seqlen, 0)
    rows = []

    def done(name: str, r, extra: str = "") -> None:
        rows.append([name, f"{r.seconds:.0f}", f"{r.peak_rss_mb:.0f}", f"{os.getloadavg()[0]:.1f}", extra])
        print(f"{name}: {r.seconds:.0f} s, {r.peak_rss_mb:.0f} MB", file=sys.stderr)

    out = args.work / "ours"
    ours = measure([sys.executable, "-m", "qcompile", model, "--to", "gguf", "--quant", "Q4_K_M", "--method",
                    "gptq", "--calib", args.calib, "--calib-samples", args.samples, "--calib-seqlen", args.seqlen,
                    "--threads", args.threads, "--no-verify", "--force", "-q", "--out", out],
                   env={"PYTHONPATH": str(src), "PYTHONSAFEPATH": "1"})
    timings = json.loads((out / "report.json").read_text())["timings_s"]
    done(f"qcompile gptq @{label}", ours, ", ".join(f"{k} {v:.0f}" for k, v in timings.items() if k != "total"))
    f16, q = args.work / "f16.gguf", args.work / "llama-Q4_K_M.gguf"
    conv = measure([sys.executable, t["convert"], model, "--outtype", "f16", "--outfile", f16])
    imat = args.work / "imatrix.gguf"
    r1 = measure([t["imatrix"], "-m", f16, "-f", text, "-c", args.seqlen, "--chunks", args.samples, "-o", imat,
                  "-t", args.threads])
    r2 = measure([t["quantize"], "--imatrix", imat, f16, q, "Q4_K_M", args.threads])
    peer = type(r1)(r1.seconds + r2.seconds, max(r1.peak_rss_mb, r2.peak_rss_mb), "")
    done("llama.cpp imatrix + quantize", peer, f"imatrix {r1.seconds:.0f}, quantize {r2.seconds:.0f}")
    done("llama.cpp convert (F16)", conv)
    f16.unlink()
    print(f"model: {model} (real_qwen.py: dequantized Q4_K_M release, function-preserving rescaling)")
    print(f"calibration: {note}")
    print(f"threads: {args.threads} of {os.cpu_count()} cores\n")
    print(table(["row", "wall s", "peak RSS MB", "load", "stages s"], rows))
    print(f"\nqcompile gptq / (imatrix + quantize): {ours.seconds / peer.seconds:.2f}x wall; "
          f"/ (convert + imatrix + quantize): {ours.seconds / (peer.seconds + conv.seconds):.2f}x")


if __name__ == "__main__":
    main()
