"""Command line: ``qcompile MODEL --to gguf --bits 4|8 | --quant TYPE --out DIR``."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qcompile import __version__
from qcompile.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, QCompileError
from quantizers.schemes import available

EXAMPLES = """\
examples:
  qcompile tiny --to gguf --bits 4 --out build/          # built-in tiny model, no download
  qcompile ./Qwen2.5-7B-Instruct --to gguf --bits 4 --out out/   # local HF checkpoint -> Q4_K_M
  qcompile 7B --family coder --to gguf --bits 8 --out out/       # Qwen2.5-Coder-7B-Instruct -> Q8_0
  qcompile Qwen/Qwen3-8B --to gguf --quant Q5_K_M --out out/     # any mix or type by name
  qcompile 0.5B --to gguf --quant Q4_0 --out out/ --eval-text wiki.txt

MODEL is a checkpoint directory, a Hugging Face repo id (cache first, download when online;
--offline or HF_HUB_OFFLINE=1 forbids downloads), a size alias (0.5B 1.5B 3B 7B 14B 32B 72B with
--family), or 'tiny'. The artifact OUT/{name}-{TYPE}.gguf and OUT/report.json are written to temp
names and renamed only once complete and verified.

exit status: 0 success, 1 error (bad input, I/O, interrupted), 2 usage error.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcompile", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Quantize a Qwen checkpoint (Qwen2, Qwen2.5 incl. Coder/Math, Qwen3) and compile it for "
                    "llama.cpp / Ollama / LM Studio (GGUF), with verification against the PyTorch reference.")
    p.add_argument("model", metavar="MODEL", help="checkpoint directory, hub repo id, size alias, or 'tiny'")
    p.add_argument("--to", default="gguf", choices=["gguf"], help="target format (default: gguf)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bits", type=int, choices=[4, 8], help="preset: 4 -> Q4_K_M (llama.cpp's mix), 8 -> Q8_0 "
                                                              "(default: 4)")
    g.add_argument("--quant", metavar="TYPE", type=str.upper,
                   help=f"a llama.cpp mix or one GGUF type: {', '.join(available())}")
    p.add_argument("--pure", action="store_true", help="one type for every weight matrix (no per-tensor mix)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument("--force", action="store_true", help="overwrite an existing artifact")
    p.add_argument("--verify", dest="verify", action="store_true", default=True,
                   help="measure perplexity/KLD vs the full-precision model and check logits in llama.cpp "
                        "(default)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip verification")
    p.add_argument("--eval-text", type=Path, metavar="FILE", help="held-out text for verification "
                                                                   "(default: a built-in sample)")
    p.add_argument("--eval-ctx", type=int, default=256, metavar="N", help="evaluation window length (default 256)")
    p.add_argument("--eval-tokens", type=int, default=1024, metavar="N",
                   help="evaluate at most N tokens of the text (default 1024)")
    p.add_argument("--family", default="instruct", choices=["instruct", "base", "coder", "math", "qwen3"],
                   help="model family for size aliases (default: instruct)")
    p.add_argument("--offline", action="store_true", help="never download; use local files and the hub cache only")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept PyTorch .bin weights (loaded with torch.load(weights_only=True)); trusted files only")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: all)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    p.add_argument("--version", action="version", version=f"qcompile {__version__}")
    return p


def _summary(rep: dict) -> str:
    a, m = rep["artifact"], rep.get("metrics") or {}
    lines = [f"wrote {a['full_path']}  ({a['bytes'] / 2**20:.1f} MiB, {a['bits_per_weight']:.2f} bits/weight, "
             f"{rep['timings_s']['total']:.1f} s)"]
    r = m.get("reference")
    if r:
        lines.append(f"  reference (PyTorch, {r['tokens']} tokens): ppl {r['ppl_fp']:.3f} -> {r['ppl_quant']:.3f}  "
                     f"mean KLD {r['kld_mean']:.5f}  top-1 {100 * r['top1']:.1f}%")
    x = m.get("artifact")
    if x:
        lines.append(f"  artifact ({x['runtime']}, {x['tokens']} tokens): logits rel. error {x['rel_error']:.2e}  "
                     f"top-1 {100 * x['top1']:.1f}% vs dequantized PyTorch")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from qcompile.pipeline import Options, compile_model
    if args.eval_ctx < 8 or args.eval_tokens < 16:
        print("qcompile: error: --eval-ctx must be >= 8 and --eval-tokens >= 16", file=sys.stderr)
        return EXIT_USAGE
    opts = Options(model=args.model, out=args.out, to=args.to, bits=args.bits, quant=args.quant, pure=args.pure,
                   force=args.force, verify=args.verify, eval_text=args.eval_text, eval_ctx=args.eval_ctx,
                   eval_tokens=args.eval_tokens, family=args.family, offline=args.offline, allow_pickle=args.allow_pickle,
                   threads=args.threads,
                   quiet=args.quiet, argv=["qcompile", *argv])
    try:
        rep = compile_model(opts)
    except QCompileError as e:
        print(f"qcompile: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyError as e:  # unknown type names from the registries
        print(f"qcompile: error: {e.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qcompile: interrupted; no output written", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:
        print(f"qcompile: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILURE
    if not args.quiet:
        print(_summary(rep))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    os._exit(main())
