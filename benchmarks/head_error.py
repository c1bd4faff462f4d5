#!/usr/bin/env python3
"""How much calibrating the output matrix saves: its output error on its own input, RTN vs imatrix vs GPTQ.

Real Qwen2.5-Coder-0.5B-Instruct (../shared/tools/real_qwen.py: a dequantized Q4_K_M release with
function-preserving channel rescaling; its checkpoint has a separate, untied output matrix). The head's input
is the final-normed hidden state of the full-precision model on ``--samples`` x ``--seqlen`` calibration
windows of quality.py's calib.txt (seed 0); ``H`` is their Gram matrix. On one vocabulary row in
``--row-sample`` (seeded), each candidate type's output error ``tr(E H Eᵀ)`` (E = quantized - float rows) for:
ggml's plain RTN (what llama-quantize does without an imatrix; the head's rounding before commit cc59cb5),
imatrix-weighted RTN (``diag(H)``: qcompile's imatrix methods since c46ebba) and GPTQ with ``H`` (gptq,
awq+gptq since cc59cb5). Rows are independent given ``H``, so a row sample measures the ratios.

    python benchmarks/head_error.py [--samples 32] [--seqlen 512] [--row-sample 32]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tools import commit, table  # noqa: E402
from kld_bench import MODEL_NOTE, REAL, real_model  # noqa: E402
from quality import calib_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REAL)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile-bench" / "quality")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--row-sample", type=int, default=32, help="one vocabulary row in N is measured")
    args = ap.parse_args()
    from gguf import GGMLQuantizationType as T

    from calibration.sources import calibration_tokens
    from qcompile.model import (
        Checkpoint,
        CheckpointSource,
        StreamedDecoder,
        read_config,
    )
    from quantizers import rtn
    from quantizers.gptq import gptq
    from quantizers.schemes import candidate_types
    model = real_model(args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = read_config(model)
    src = CheckpointSource(Checkpoint(model, cfg))
    dec = StreamedDecoder(cfg)
    tokens = calibration_tokens(str(calib_text(args.work)), model, args.samples, args.seqlen, 0)
    t0 = time.perf_counter()
    h = dec.embed(src, tokens)
    for i in range(cfg.num_layers):
        h = dec.run_layer(dec.build_layer(i, src), h, 4)
    x = dec.final_norm(src, h).reshape(-1, cfg.hidden_size).double()
    gram = (x.T @ x / x.shape[0]).float().numpy()
    del h, x
    forward_s = time.perf_counter() - t0
    w_all = src.full(dec.head_name)
    vocab = len(w_all)
    rows = np.sort(np.random.default_rng(0).choice(vocab, vocab // args.row_sample, replace=False))
    w = np.ascontiguousarray(w_all[rows], dtype=np.float32)
    del w_all
    out_err = lambda q: float(np.einsum("ij,jk,ik->", q.dequantize() - w, gram, q.dequantize() - w,
                                        optimize=True))
    out = []
    # the head's candidates under a budget (after llama.cpp's fallback for its width) and Q4_K's fallback
    for t in dict.fromkeys([*candidate_types(w.shape[1]), *candidate_types(w.shape[1], (T.Q4_K,))]):
        plain = out_err(rtn.quantize(dec.head_name, w, t))
        weighted = out_err(rtn.quantize(dec.head_name, w, t, importance=np.diag(gram).copy()))
        g = out_err(gptq(dec.head_name, w, gram.copy(), t))
        out.append([t.name, f"{plain:.4g}", f"{weighted:.4g}", f"{g:.4g}", f"{weighted / plain:.3f}",
                    f"{g / plain:.3f}"])
    print(f"model: {model} ({MODEL_NOTE})\ncommit {commit()}; head input: final-normed states of the float model "
          f"on {args.samples} x {args.seqlen} windows of {calib_text(args.work).name} (seed 0; forward "
          f"{forward_s:.0f} s); {len(rows)} of {vocab} vocabulary rows (1 in "
          f"{args.row_sample}, seeded)\n")
    print(table(["type", "RTN tr(EHEᵀ)", "imatrix RTN", "GPTQ", "imatrix / RTN", "GPTQ / RTN"], out))


if __name__ == "__main__":
    main()
