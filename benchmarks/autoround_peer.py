#!/usr/bin/env python3
"""auto-round (Intel's sign-gradient rounding, `pip install auto-round`) as a GGUF peer, calibrated on the
very token windows qcompile uses (a .npy of [samples, seqlen] token ids).

auto-round pins its own versions of transformers/accelerate/datasets, so it runs in its own environment,
not qcompile's: benchmarks/quality.py calls this script with ``--autoround-python`` (a venv made with
``pip install torch==2.13.0 auto-round sentencepiece`` and then ``pip install LLAMA_CPP/gguf-py``: auto-round
0.16's bundled GGUF converter needs a gguf-py newer than PyPI's 0.19, such as the one the llama-cpp-python
sdist vendors, ~/.cache/qcompile/llama.cpp-*/llama_cpp_python-*/vendor/llama.cpp/gguf-py). Its own defaults (200 iterations of sign-gradient descent per
block, its default learning rate) unless ``--light`` (its ``auto-round-light`` recipe: 50 iterations at learning
rate 5e-3) or ``--iters`` is given; the output is auto-round's own GGUF writer's file.

    python benchmarks/autoround_peer.py MODEL_DIR WINDOWS.npy OUT_DIR [--format gguf:q4_k_m] [--light | --iters N]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("windows")
    ap.add_argument("out")
    ap.add_argument("--format", default="gguf:q4_k_m")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--iters", type=int, help="auto-round's iterations per block (default: its own, 200)")
    how.add_argument("--light", action="store_true",
                     help="auto-round's light recipe (its CLI's auto-round-light: iters 50, lr 5e-3)")
    args = ap.parse_args()
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer
    windows = np.load(args.windows)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    tok = AutoTokenizer.from_pretrained(args.model)
    # a list of [1, seqlen] input_ids tensors is auto-round's "your own tokens" dataset form
    data = [torch.from_numpy(w[None].astype(np.int64)) for w in windows]
    # the light recipe's values are those of auto_round/cli/main.py's "light" entry (auto-round 0.16)
    kw = {"iters": 50, "lr": 5e-3} if args.light else {} if args.iters is None else {"iters": args.iters}
    ar = AutoRound(model, tokenizer=tok, scheme=args.format, dataset=data, nsamples=len(windows),
                   seqlen=int(windows.shape[1]), device_map="cpu", **kw)
    ar.quantize_and_save(args.out, format=args.format)


if __name__ == "__main__":
    main()
