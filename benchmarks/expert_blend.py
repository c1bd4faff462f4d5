#!/usr/bin/env python3
"""What a thinly routed expert should be calibrated with, measured on the real-weight MoE.

An expert the calibration routes fewer tokens than its input width has a Hessian its tokens cannot span.
``calibration.capture.EXPERT_THIN`` offers three rules, and this runs GPTQ Q4_K_M once per rule on a
calibration small enough that *every* expert is thin (``--samples`` x ``--seqlen`` tokens, default 2 x 128:
each of the 15 experts gets about 205 routed tokens at top-12, below its 896 inputs):

* ``blend`` — its tokens plus a seeded sample of the layer's other tokens, weighted to count its width;
* ``own`` — its tokens alone (GPTQ's damping fills the missing rank);
* ``imatrix`` — imatrix-weighted RTN on its own tokens' statistics (plain RTN when it has none), what
  llama.cpp's imatrix does for an expert.

The model is benchmarks/upcycle.py's (the real 0.5B of ../shared/tools/real_qwen.py upcycled into a qwen2_moe:
shared expert + 15 x 256 routed, top-12, a fitted router; NOT a Qwen release); scores are benchmarks/
unseen_bench.py's (``llama-perplexity --kl-divergence`` against its F16, the four unseen sets and the in-domain
held-out text of benchmarks/moe_bench.py), so the rows sit in moe_bench's cache and table format. Each row
runs qcompile from this checkout's working tree with the rule set (``build``), keyed by the commit.

    python benchmarks/expert_blend.py [--samples 2] [--seqlen 128] [--rules blend own imatrix]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
RULES = ("blend", "own", "imatrix")


def build(args: argparse.Namespace) -> None:
    """One row: qcompile GPTQ Q4_K_M with ``EXPERT_THIN`` set to the rule, into ``--out``."""
    from calibration import capture
    from qcompile.cli import main as qcompile
    capture.EXPERT_THIN = args.rule
    rc = qcompile([str(args.model), "--to", "gguf", "--quant", "Q4_K_M", "--method", "gptq", "--calib",
                   str(args.calib), "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen),
                   "--out", str(args.out), "--no-verify", "-q"])
    raise SystemExit(rc)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    b = sub.add_parser("build")
    for p in (ap, b):
        p.add_argument("--samples", type=int, default=2)
        p.add_argument("--seqlen", type=int, default=128)
    b.add_argument("--rule", choices=RULES, required=True)
    b.add_argument("--model", type=Path, required=True)
    b.add_argument("--calib", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    args = ap.parse_args(argv)
    if args.cmd == "build":
        return build(args)

    import moe_bench
    import unseen_bench
    import upcycle
    from kld_bench import REAL, real_model
    moe = upcycle.build(real_model(REAL), upcycle.DEFAULT_OUT, experts=15, top_k=12, shared=1024, fit_tokens=8192,
                        spread=0.05)
    work = moe_bench.WORK
    calib = work / "calib.txt"      # benchmarks/quality.py's: the first third of each ../shared/corpora file
    if not calib.is_file():
        raise SystemExit(f"{calib}: run benchmarks/moe_bench.py first (it writes the calibration and eval text)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                            check=True).stdout.strip()
    argv = ["--model", str(moe), "--work", str(work / "runs"), "--no-peers", "--text", f"in-domain={work / 'eval.txt'}",
            "--json", str(work / "runs" / "expert-blend.json")]
    for rule in args.rules:
        label = f"qcompile gptq {args.samples}x{args.seqlen}, thin experts by {rule}"  # (no colon: --external splits on it)
        argv += ["--external", f"{label}:{commit}:{sys.executable} {HERE / 'expert_blend.py'} build --rule {rule} "
                               f"--model {moe} --calib {calib} --samples {args.samples} --seqlen {args.seqlen} "
                               "--out {out}"]
    unseen_bench.main(argv)


if __name__ == "__main__":
    main()
