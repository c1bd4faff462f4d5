#!/usr/bin/env python3
"""What the sensitivity analysis (``--max-size`` and the default ``--bits 4``) costs and how stable its
choice is: the allocation at llama.cpp's Q4_K_M size on the real 0.5B (``../shared/tools/real_qwen.py``'s
Qwen2.5-Coder-0.5B-Instruct: a dequantized Q4_K_M release with function-preserving channel rescaling, not
Qwen's published weights), from the Fisher on N windows of 256 python-docs tokens, in float32 or with the
bfloat16 products the pipeline uses, each type's prediction on every row or on one row in R (the
pipeline's ratio estimator, ``sensitivity.ROW_SAMPLE``). Prints each setting's wall time, predicted KLD
and how many of the tensors' types differ from the first setting's choice.

    python benchmarks/sensitivity_bench.py [--model DIR] [--settings 8:bf16:1 8:bf16:8 16:fp32:1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tools import SHARED  # noqa: E402
from kld_bench import REAL, real_model  # noqa: E402


def allocation(model: Path, windows: int, bf16: bool, row_sample: int) -> tuple[float, float, dict[str, str]]:
    """(seconds of the analysis, predicted KLD, GGUF name -> chosen type) at Q4_K_M's size."""
    from calibration import sensitivity as sens
    from calibration.sources import calibration_tokens
    from qcompile import api
    from qcompile import budget as mix
    from qcompile.model import CheckpointSource
    sens.BF16, sens.SAMPLES, sens.ROW_SAMPLE = bf16, windows, row_sample
    # --bits 4 with a calibrated method: the plan holds Q4_K_M's types, its size as the budget, the size model
    job = api.plan(model, bits=4, method="imatrix")
    plan = job.target.types.plan
    tokens = calibration_tokens(str(SHARED / "corpora" / "python-docs.txt"), job.res.path, windows, 256, 0)
    t0 = time.perf_counter()
    predicted, _ = mix.analyse(job.cfg, CheckpointSource(job.ckpt), plan, job.sizes, tokens, use_imatrix=True,
                               device="cpu", seed=0, threads=None)
    seconds = time.perf_counter() - t0
    chosen, alloc = mix.choose_mix(plan, job.sizes, predicted, job.budget)
    return seconds, alloc.kld, {p.name: p.type.name for p in chosen if p.name in job.sizes.options}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REAL)
    ap.add_argument("--settings", nargs="+", default=["8:bf16:1", "8:bf16:8", "16:fp32:1"],
                    help="WINDOWS:fp32|bf16:ROWS, ROWS = predict on one row in ROWS (the first is the reference "
                         "choice)")
    args = ap.parse_args()
    model = real_model(args.model).resolve()
    print(f"model: {model} (real_qwen.py: a dequantized Q4_K_M release, rescaled off-grid)")
    print("| windows x 256 tokens | products | rows predicted | analysis s | predicted KLD | types differing from "
          "the first row |")
    print("|---|---|---|---|---|---|")
    ref = None
    for setting in args.settings:
        n, kind, rows = setting.split(":")
        s, kld, types = allocation(model, int(n), kind == "bf16", int(rows))
        ref = ref or types
        diff = sum(types[k] != ref[k] for k in ref)
        print(f"| {n} | {kind} | {'all' if int(rows) <= 1 else f'1 in {rows}'} | {s:.1f} | {kld:.5f} | "
              f"{diff} of {len(ref)} |", flush=True)


if __name__ == "__main__":
    main()
