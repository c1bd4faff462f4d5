#!/usr/bin/env python3
"""Why the calibration passes pick their dtype per machine: torch's matrix-product throughput on this CPU in
float32, bfloat16 and float16, and the compute dtype qcompile chooses here (quantizers.linalg.compute_dtype).

On CPUs with AVX512-BF16 / AMX bfloat16 products run at several times float32's rate; on an AVX2-only CPU
torch emulates them, far slower than float32. The shape is one 2048-token batch through a 0.5B MLP projection
(the layer engine's batch, ``calibration.capture.BATCH_TOKENS``).

    python benchmarks/matmul_dtypes.py [--tokens 2048] [--inner 896] [--outer 4864]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from quantizers import linalg
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--inner", type=int, default=896)
    ap.add_argument("--outer", type=int, default=4864)
    a = ap.parse_args()
    flags = sorted(linalg._cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, flags {' '.join(flags) or '-'}")
    x = torch.randn(a.tokens, a.inner)
    w = torch.randn(a.inner, a.outer)
    flop = 2 * a.tokens * a.inner * a.outer
    rows = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        xd, wd = x.to(dt), w.to(dt)
        xd @ wd  # warm up
        t = time.perf_counter()
        n = 0
        while n < 3 or time.perf_counter() - t < 1.0:
            xd @ wd
            n += 1
        s = (time.perf_counter() - t) / n
        rows.append((str(dt).removeprefix("torch."), s, flop / s / 1e9))
    f32 = rows[0][2]
    print(f"[{a.tokens} x {a.inner}] @ [{a.inner} x {a.outer}]")
    print("| dtype | ms per product | GFLOP/s | / float32 |\n|---|---|---|---|")
    for name, s, g in rows:
        print(f"| {name} | {s * 1e3:.1f} | {g:.1f} | {g / f32:.3f} |")
    print(f"qcompile's compute dtype here: {linalg.compute_dtype('cpu')}"
          f" ({linalg.COMPUTE_DTYPE_ENV}={os.environ.get(linalg.COMPUTE_DTYPE_ENV, '') or 'unset'})")


if __name__ == "__main__":
    main()
