"""Peak memory of the calibrated path (layer engine + GPTQ) on one Qwen2.5-7B-shaped decoder layer.

Builds (unless ``--model`` is given) a synthetic Qwen2.5-7B checkpoint cut to one decoder layer
(``benchmarks/synthetic.py``: random weights, rows of norm ~0.6, the real shapes: hidden 3584,
intermediate 18944, 28/4 heads) and compiles it to Q4_K_M with GPTQ on 32 x 256 calibration tokens of a
text file, under GNU time. The widest Hessian is down_proj's 18944^2 (1.4 GB in float32): the layer
is the per-layer peak of a 7B run. The checkpoint also holds the 152064 x 3584 embedding and head,
which RTN streams in row chunks.

    python benchmarks/layer_memory.py [--model DIR] [--limit-mb 3584]

Prints the peak RSS and exits 1 above the limit.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tools import SHARED, measure  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a checkpoint to use instead of building the synthetic one")
    ap.add_argument("--calib", type=Path, default=SHARED / "corpora" / "python-docs.txt")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--limit-mb", type=float, default=3584, help="fail above this peak RSS (default 3.5 GiB)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qcompile-layer-memory-") as tmp:
        model = args.model
        if model is None:
            from synthetic import build
            model = build("7B", Path(tmp) / "synth-7B-1", layers=1)
        run = measure([sys.executable, "-m", "qcompile", model, "--to", "gguf", "--quant", "Q4_K_M",
                       "--method", "gptq", "--calib", args.calib, "--calib-samples", args.samples,
                       "--calib-seqlen", args.seqlen, "--no-verify", "--out", Path(tmp) / "out", "-q"])
    print(f"{model.name}: gptq Q4_K_M on {args.samples} x {args.seqlen} tokens: peak RSS {run.peak_rss_mb:.0f} MiB "
          f"(limit {args.limit_mb:.0f}), {run.seconds:.0f} s")
    return 0 if run.peak_rss_mb <= args.limit_mb else 1


if __name__ == "__main__":
    sys.exit(main())
