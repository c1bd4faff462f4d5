"""Command line: ``qcompile MODEL --to gguf --bits 4|8 | --quant TYPE --out DIR``."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qcompile import __version__
from qcompile.errors import EXIT_OK, EXIT_USAGE, guarded
from quantizers import QUANTIZERS
from quantizers.schemes import available

EXAMPLES = """\
examples:
  qcompile tiny --to gguf --bits 4 --out build/          # built-in tiny model, no download
  qcompile ./Qwen2.5-7B-Instruct --to gguf --bits 4 --out out/   # local HF checkpoint -> Q4_K_M
  qcompile 7B --family coder --to gguf --bits 8 --out out/       # Qwen2.5-Coder-7B-Instruct -> Q8_0
  qcompile Qwen/Qwen3-8B --to gguf --quant Q5_K_M --out out/     # any mix or type by name
  qcompile 0.5B --to gguf --quant Q4_0 --out out/ --eval-text wiki.txt
  qcompile 7B --to gguf --bits 4 --out out/ --package all   # + Ollama Modelfile, LM Studio folder, manifest
  qcompile 0.5B --to gguf --max-size 468.6MiB --out out/  # per-tensor types by sensitivity, within 468.6 MiB
  qcompile 0.5B --to gguf --bits 4 --out out/ --baseline last/report.json   # publish only if no regression
  qcompile 0.5B --to onnx --bits 4 --out onnx/       # onnxruntime folder, int4 g128 MatMulNBits (GPTQ)
  qcompile 0.5B --to openvino --bits 4 --out ov/      # OpenVINO IR folder, u4 g128 compressed weights (GPTQ)
  qcompile 0.5B --to openvino --quant INT8_PC --out ov8/   # u8 per-channel weights (NNCF's int8 default)

MODEL is a checkpoint directory, a Hugging Face repo id (cache first, download when online;
--offline or HF_HUB_OFFLINE=1 forbids downloads), a size alias (0.5B 1.5B 3B 7B 14B 32B 72B with
--family; mixture-of-experts 30B-A3B 235B-A22B 480B-A35B 57B-A14B; --family qwen3.5: the linear-attention
hybrids 0.8B 2B 4B 9B 27B 35B-A3B 122B-A10B 397B-A17B, GGUF only), or 'tiny'. The artifact OUT/{name}-{TYPE}.gguf and OUT/report.json are written to temp
names and renamed only once complete and verified.

other commands:
  qcompile eval MODEL --artifact FILE.gguf --text FILE [--ctx N --stride N]   # ppl / KLD / top-1
  qcompile run ARTIFACT "prompt"     # greedy generation in the artifact's runtime (GGUF, ONNX or IR folder)
  qcompile check out/report.json --baseline base/report.json   # CI gate: exit 1 on a quality/size regression
  qcompile report out/q4 out/q8 --out report/   # report.md table + report.html with plots, comparing runs
  qcompile build MATRIX.toml --out dist/   # models x formats x types x methods, on Ray (qcompile build -h)

exit status: 0 success, 1 error (bad input, I/O, interrupted), 2 usage error.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcompile", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Quantize a Qwen checkpoint (Qwen2, Qwen2.5 incl. Coder/Math, Qwen3) and compile it for "
                    "llama.cpp / Ollama / LM Studio (GGUF), with verification against the PyTorch reference.")
    p.add_argument("model", metavar="MODEL", help="checkpoint directory, hub repo id, size alias, or 'tiny'")
    import exporters  # the targets' registry (numpy, gguf: a quarter second)
    p.add_argument("--to", default="gguf", choices=list(exporters.TARGETS),
                   help="target format (default: gguf). onnx: a model folder for onnxruntime (optimum's "
                        "ORTModelForCausalLM layout) with int4/int8 MatMulNBits weights; openvino: an IR folder "
                        "(OVModelForCausalLM / openvino_genai layout, stateful KV cache) with u4/u8 weights")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bits", type=int, choices=[4, 8], help="preset (default 4): gguf 4 -> the size of "
                   "llama.cpp's Q4_K_M, each linear's type chosen by measured sensitivity (as --max-size; with "
                   "--calib, or --method rtn: Q4_K_M's own types; --quant Q4_K_M: always those), 8 -> Q8_0; "
                   "onnx/openvino 4 -> INT4_G128, 8 -> INT8_G128")
    g.add_argument("--quant", metavar="TYPE", type=str.upper,
                   help=f"gguf: a llama.cpp mix or one GGUF type: {', '.join(available())}; onnx/openvino: an integer "
                        "grid INT{4,8}_G{16..256}[_SYM] (asymmetric unless _SYM); openvino also takes per-channel "
                        "grids INT{4,8}_PC[_SYM] (one scale per output row, as NNCF's group_size -1; its lm_head "
                        "and embeddings are then INT8_PC)")
    p.add_argument("--pure", action="store_true", help="one type for every weight matrix (no per-tensor mix)")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--max-size", metavar="SIZE",
                   help="gguf: choose each decoder linear's (and an untied output matrix's) type among Q4_K, Q5_K, "
                        "Q6_K, Q8_0 and the preset's own types (a 3-bit preset's Q3_K etc. for every tensor) by "
                        "measured sensitivity (diagonal Fisher on the calibration text) so the whole "
                        "file fits SIZE bytes (491400096, 468.6MiB, 0.49GB) with the least predicted KLD; the "
                        "embeddings keep the --bits/--quant preset's type")
    b.add_argument("--target-bpw", type=float, metavar="X",
                   help="gguf: like --max-size, the budget given as bits per weight over all parameters (as "
                        "report.json's bits_per_weight counts them)")
    p.add_argument("--method", default="auto", choices=["auto", *QUANTIZERS],
                   help="auto (default): gptq when --calib is given; imatrix on self-generated text for --bits 4 "
                        "(and the codebook types) without it; rtn otherwise. The calibrated methods also round the "
                        "output matrix on its own input (GGUF). "
                        + "; ".join(f"{m.name}: {m.help}" for m in QUANTIZERS.values()))
    p.add_argument("--calib", metavar="SRC", help="calibration data: a .txt/.jsonl file or folder, "
                   "hf:NAME[:CONFIG[:SPLIT]] (datasets), or 'self' (text generated by the model; the default)")
    p.add_argument("--calib-samples", type=int, metavar="N", help="calibration samples (default 128; 32 for self)")
    p.add_argument("--calib-seqlen", type=int, metavar="N",
                   help="tokens per sample (default 512 on CPU, 2048 on CUDA; 256 for self)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling (default 0)")
    p.add_argument("--device", default="auto", help="torch device for calibration: auto, cpu, cuda, cuda:N")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted calibrated run from its last finished layer")
    p.add_argument("--calib-cache", type=Path, metavar="DIR",
                   help="keep the calibration tokens and the calibrated layers in DIR for other compiles of the same "
                        "model and calibration: one with the same method and weight grid (e.g. --to onnx and --to "
                        "openvino, both INT4_G128) reuses the quantized layers, one with another grid the tokens; an "
                        "interrupted run resumes from its last finished layer. `qcompile build` gives its entries one")
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
    q = p.add_argument_group(
        "quality gate", "judge the verified metrics before the artifact is renamed into place; on a violation "
        "exit 1 with the measured figures and write nothing (the budgets of `qcompile check`)")
    q.add_argument("--max-kld", metavar="X", help="mean KLD ceiling (reference path): a number, or +P%% over "
                                                 "--baseline's (with --baseline, default +5%%)")
    q.add_argument("--baseline", type=Path, metavar="REPORT", help="an earlier report.json of the same model and "
                   "evaluation settings: also perplexity <= +0.5%%, top-1 >= -0.5 points, size <= +1%% unless set")
    q.add_argument("--max-ppl-increase", metavar="P%", help="with --baseline: perplexity increase allowed "
                                                              "(default 0.5%%)")
    q.add_argument("--max-top1-drop", metavar="PTS", type=float, help="with --baseline: top-1 agreement drop "
                                                                      "allowed, in percentage points (default 0.5)")
    p.add_argument("--family", default="instruct", choices=["instruct", "base", "coder", "math", "qwen3", "qwen3.5", "qwen3.6"],
                   help="model family for size aliases (default: instruct)")
    p.add_argument("--offline", action="store_true", help="never download; use local files and the hub cache only")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept PyTorch .bin weights (loaded with torch.load(weights_only=True)); trusted files only")
    p.add_argument("--keep-embeddings-fp", action="store_true",
                   help="onnx/openvino: keep lm_head and the input embeddings in float (default: lm_head 8-bit, "
                        "same group size; input embeddings: onnx float32, openvino 8-bit like NNCF; a tied float "
                        "matrix is stored once)")
    p.add_argument("--float-activations", action="store_true",
                   help="onnx: MatMulNBits with float activations (accuracy_level 0: exactly the dequantized "
                        "model; default: int8 activations, accuracy_level 4, ~1.7x faster decoding on CPUs)")
    p.add_argument("--package", choices=["ollama", "lmstudio", "all"],
                   help="gguf: also package the verified file. ollama: OUT/Modelfile (the model's chat template "
                        "incl. tools as an Ollama template, stop tokens, default system prompt, sampling defaults) "
                        "and `ollama create` when ollama is on PATH; lmstudio: OUT/lmstudio/<publisher>/<Model>-GGUF/ "
                        "with the GGUF (hard link or copy) and a model card; all: both. Adds OUT/manifest.json "
                        "(every file, size, sha256)")
    p.add_argument("--mmproj", choices=["auto", "f16", "q8_0", "none"], default="auto",
                   help="gguf, multimodal checkpoint (Qwen3.5): also write its vision tower as "
                        "OUT/mmproj-{name}-{TYPE}.gguf for llama.cpp's multimodal tools (llama-mtmd-cli, llama-server "
                        "--mmproj). auto: f16 when the checkpoint has a vision tower; none: the text model only")
    p.add_argument("--no-mtp", action="store_true",
                   help="gguf, Qwen3.5 / Qwen3-Next: leave out the checkpoint's multi-token-prediction layers (mtp.*). "
                        "By default they are carried, as llama.cpp's converter does, as nextn layers after the "
                        "decoder's (RTN with the mix's types), which llama.cpp can use for speculative decoding")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: all)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each stage's predicted peak memory and time (from the plan and a second of probes "
                        "of this machine), then stop without writing anything")
    p.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                   help="run even when the predicted peak memory exceeds the memory available (default: refuse, "
                        "naming the option that lowers it)")
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


COMMANDS = {"eval": "qcompile.eval_command", "run": "qcompile.run_command", "check": "qcompile.check_command",
            "report": "qcompile.report_command", "build": "qcompile.build_command"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:  # subcommands; a model directory named like one: ./eval
        import importlib
        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    from qcompile.pipeline import Options, compile_model
    if args.eval_ctx < 8 or args.eval_tokens < 16:
        print("qcompile: error: --eval-ctx must be >= 8 and --eval-tokens >= 16", file=sys.stderr)
        return EXIT_USAGE
    opts = Options(model=args.model, out=args.out, to=args.to, bits=args.bits, quant=args.quant, pure=args.pure, method=args.method,
                   calib=args.calib, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                   seed=args.seed, device=args.device, resume=args.resume, calib_cache=args.calib_cache,
                   force=args.force, verify=args.verify, eval_text=args.eval_text, eval_ctx=args.eval_ctx,
                   eval_tokens=args.eval_tokens, family=args.family, offline=args.offline, allow_pickle=args.allow_pickle,
                   keep_embeddings_fp=args.keep_embeddings_fp, float_activations=args.float_activations,
                   package=args.package, mmproj=args.mmproj, no_mtp=args.no_mtp, max_size=args.max_size, target_bpw=args.target_bpw, threads=args.threads,
                   dry_run=args.dry_run, memory_check=args.memory_check, quiet=args.quiet, baseline=args.baseline,
                   max_kld=args.max_kld, max_ppl_increase=args.max_ppl_increase, max_top1_drop=args.max_top1_drop,
                   argv=["qcompile", *argv])
    code, rep = guarded("qcompile", lambda: compile_model(opts), "interrupted; no output written")
    if code != EXIT_OK:
        return code
    if not args.quiet and "dry_run" not in rep:
        print(_summary(rep))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    os._exit(main())
