"""``qcompile eval MODEL [--artifact FILE.gguf] --text FILE``: perplexity, KLD and top-1 vs the fp model.

Paths, as in a compile's verification: ``pytorch`` runs the artifact's dequantized weights in the
reference decoder (isolates weight quantization), ``llama.cpp`` runs the artifact itself through
llama-cpp-python (adds the runtime's own arithmetic: activation rounding, kernels); ``onnxruntime`` and
``openvino`` run an ONNX or IR folder. Without ``--artifact`` only the full-precision perplexity is measured.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qcompile.errors import EXIT_OK, QCompileError, guarded


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcompile eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure perplexity (sliding window), mean KL divergence and top-1 agreement of a quantized "
                    "artifact against its full-precision model.",
        epilog="example:\n  qcompile eval ./Qwen2.5-0.5B-Instruct --artifact out/Qwen2.5-0.5B-Instruct-Q4_K_M.gguf "
               "--text wiki.txt --ctx 512 --stride 256\n\nexit status: 0 success, 1 error, 2 usage error.")
    p.add_argument("model", metavar="MODEL", help="the full-precision checkpoint (directory, hub id, alias, 'tiny')")
    p.add_argument("--artifact", type=Path, metavar="PATH", help="a GGUF file (any GGUF of this model), or an ONNX "
                                                                 "or OpenVINO IR folder written by qcompile")
    p.add_argument("--text", type=Path, required=True, metavar="FILE", help="evaluation text (held out from "
                                                                            "calibration)")
    p.add_argument("--ctx", type=int, default=512, metavar="N", help="window length in tokens (default 512)")
    p.add_argument("--stride", type=int, metavar="N", help="window step; each token is scored once, with at least "
                                                           "ctx - stride tokens of context (default: ctx)")
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="evaluate at most N tokens of the "
                                                                             "text (default 4096)")
    p.add_argument("--runtime", choices=["auto", "pytorch", "llama.cpp", "onnxruntime", "openvino", "all"],
                   default="auto",
                   help="pytorch: a GGUF's dequantized weights in the reference decoder; llama.cpp: the GGUF in "
                        "llama-cpp-python; onnxruntime: an ONNX folder; openvino: an IR folder (CPU, f32 inference, "
                        "no dynamic activation quantization, f32 KV cache); auto (default): every path that applies")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--family", default="instruct", help="model family for size aliases (default: instruct)")
    p.add_argument("--offline", action="store_true", help="never download")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: all)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def evaluate_artifact(args: argparse.Namespace) -> dict:
    """Run the evaluation; return ``{"model", "artifact", "text", "ctx", "stride", "results": {path: metrics}}``."""
    from tqdm import tqdm

    import exporters
    from qcompile import evaluate
    from qcompile.model import Checkpoint, CheckpointSource, read_config
    from qcompile.resolve import resolve
    if args.ctx < 8 or args.max_tokens < 16 or (args.stride is not None and args.stride < 1):
        raise QCompileError("--ctx must be >= 8, --max-tokens >= 16 and --stride >= 1")
    res = resolve(args.model, family=args.family, offline=args.offline)
    cfg = read_config(res.path)
    try:
        text = args.text.read_text(encoding="utf-8")
    except OSError as e:
        raise QCompileError(f"--text {args.text}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise QCompileError(f"--text {args.text}: not UTF-8 text") from None
    ids = evaluate.tokenize(res.path, text)
    if len(ids) < 16:
        raise QCompileError(f"--text {args.text}: only {len(ids)} tokens; need at least 16")
    windows, score = evaluate.make_windows(ids, args.ctx, args.max_tokens, args.stride)
    fp = CheckpointSource(Checkpoint(res.path, cfg))
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    paths, kind = [], None
    if args.artifact is not None:
        kind = exporters.for_artifact(args.artifact)
        if kind is None:
            what = exporters.describe().replace(", ", " or ")
            raise QCompileError(f"--artifact {args.artifact}: " + ("not " + what if args.artifact.exists()
                                                                    else f"no such file or folder ({what})"))
        offline = ["pytorch"] if kind.has_weights else []  # the dequantized weights in PyTorch
        runtime = kind.runtime
        want = {"auto": offline + ([runtime] if kind.runtime_available() else []), "all": offline + [runtime],
                "pytorch": offline, runtime: [runtime]}.get(args.runtime, [])
        if not want:
            raise QCompileError(f"--runtime {args.runtime}: {args.artifact} runs in {' or '.join(offline + [runtime])}")
        if runtime in want and not kind.runtime_available():
            raise QCompileError(f"--runtime {runtime}: {runtime} is not installed (pip install 'qcompile[llama]' for "
                                "llama.cpp, onnxruntime or openvino)")
        paths = want
    results: dict[str, dict] = {}
    bar = lambda n, desc: tqdm(total=n, desc=desc, disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
    if not paths:  # the fp model alone: compare it with itself for its perplexity
        with bar(cfg.num_layers, "eval (fp)") as b:
            m, _ = evaluate.reference_eval(cfg, fp, fp, windows, score=score, progress=lambda s: b.update(1))
        results["fp"] = {"tokens": m.tokens, "windows": m.windows, "ctx": m.ctx, "ppl": m.ppl_fp}
    if "pytorch" in paths:
        q = kind.weights(args.artifact, cfg)
        with bar(cfg.num_layers, "eval (PyTorch, dequantized)") as b:
            m, _ = evaluate.reference_eval(cfg, fp, q, windows, score=score, progress=lambda s: b.update(1))
        results["pytorch"] = m.as_dict()
    if kind is not None and kind.runtime in paths:
        try:
            runner = kind.runner(args.artifact, args.threads)
        except QCompileError:
            raise
        except Exception as e:  # onnxruntime / openvino raise their own exception types
            raise QCompileError(f"{kind.runtime} could not load {args.artifact} ({e})") from None
        with bar(cfg.num_layers + len(windows), f"eval ({kind.runtime})") as b:
            m = evaluate.runtime_eval(cfg, fp, windows, score, runner.logits, progress=lambda s: b.update(1))
        results[kind.runtime] = m.as_dict()
    return {"model": str(res.path), "artifact": str(args.artifact) if args.artifact else None,
            "text": str(args.text), "ctx": int(windows.shape[1]), "stride": args.stride or int(windows.shape[1]),
            "results": results}


def format_results(out: dict) -> str:
    lines = [f"{'path':<12} {'tokens':>7} {'ppl fp':>9} {'ppl quant':>10} {'mean KLD':>10} {'p99 KLD':>9} {'top-1':>7}"]
    for path, m in out["results"].items():
        if path == "fp":
            lines.append(f"{'fp':<12} {m['tokens']:>7} {m['ppl']:>9.4f}")
        else:
            lines.append(f"{path:<12} {m['tokens']:>7} {m['ppl_fp']:>9.4f} {m['ppl_quant']:>10.4f} "
                         f"{m['kld_mean']:>10.5f} {m['kld_p99']:>9.4f} {100 * m['top1']:>6.2f}%")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    def work() -> dict:
        out = evaluate_artifact(args)
        if args.json:
            from qcompile.report import atomic_write_text
            atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
        return out

    code, out = guarded("qcompile eval", work)
    if code != EXIT_OK:
        return code
    print(format_results(out))
    return EXIT_OK

