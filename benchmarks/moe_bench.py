#!/usr/bin/env python3
"""MoE quality per byte: qcompile's methods vs llama.cpp's quantizer on a real-weight mixture of experts.

The model is benchmarks/upcycle.py's: the real Qwen2.5-Coder-0.5B-Instruct of ../shared/tools/real_qwen.py
(a dequantized Q4_K_M release with function-preserving rescaling) upcycled into a ``qwen2_moe`` with a shared
expert and 15 routed experts of width 256, top-12, and a router fitted on brown.txt — NOT a Qwen release; its
PPLs are its own, and every KLD is against its own bf16 weights (convert_hf_to_gguf's F16).

Everything else is benchmarks/quality.py (which this runs with ``--model`` set to the MoE): the same 128 x 512
calibration windows for qcompile and llama-imatrix (identical windows, decoded to text for the peer),
``llama-perplexity --kl-divergence`` on the in-domain held-out text and the four unseen sets, each row's
commit. Rows: llama-quantize Q4_K_M, llama-quantize --imatrix Q4_K_M, and qcompile rtn / imatrix / gptq / awq
with llama.cpp's Q4_K_M types (the same file size: the MoE mix rules are llama.cpp's, tests/test_moe.py).
Then the experts' share of the error: the peer's and GPTQ's expert tensors alone in the F16 (splice.py).

    python benchmarks/moe_bench.py [--methods rtn imatrix gptq awq] [--samples 128] [--seqlen 512] [...]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402
import upcycle  # noqa: E402
from kld_bench import REAL, real_model  # noqa: E402

WORK = Path.home() / ".cache" / "qcompile-bench" / "moe-quality"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    moe = upcycle.build(real_model(REAL), upcycle.DEFAULT_OUT, experts=15, top_k=12, shared=1024, fit_tokens=8192,
                        spread=0.05)
    print(f"model: {moe} (benchmarks/upcycle.py: the real 0.5B upcycled into qwen2_moe, shared expert 1024 + 15 x "
          f"256 routed, top-12, fitted router; not a Qwen release)", file=sys.stderr)
    if "--methods" not in argv:
        argv += ["--methods", "rtn", "imatrix", "gptq", "awq"]
    if "--work" not in argv:
        argv += ["--work", str(WORK)]
    quality.main(["--model", str(moe), *argv])
    experts_share(moe, Path(argv[argv.index("--work") + 1]).resolve())


def experts_share(moe: Path, work: Path) -> None:
    """The experts' share of the error: the llama-imatrix peer's and qcompile GPTQ's files with only their
    expert tensors (ffn_*_exps) taken over into the F16, everything else left F16, scored like the rows above
    (benchmarks/splice.py; unseen_bench's --external rows, so cached and labelled the same way); and the whole
    file at Q8_0 for context."""
    import json

    import unseen_bench
    runs = work / "runs"
    table = json.loads((runs / "table.json").read_text())
    builds = json.loads((runs / "results.json").read_text())["builds"]
    f16 = runs / f"f16-{unseen_bench.model_id(moe)}" / "convert-F16.gguf"
    splice = Path(__file__).resolve().parent / "splice.py"
    argv = ["--model", str(moe), "--work", str(runs), "--no-peers", "--text", f"in-domain={work / 'eval.txt'}",
            "--json", str(runs / "experts-share.json")]
    # context: the whole file at Q8_0, where rounding is small and what is left is mostly routing flips (the
    # upcycled router's logits are near-ties: a small change of the layer input reorders the experts)
    q8 = unseen_bench.tools()["quantize"]
    argv += ["--external", f"llama-quantize Q8_0 (whole file; the routing-flip floor):llama.cpp-0.3.36:{q8} {f16} "
                           "{out}/q8_0.gguf Q8_0"]
    rows = table["rows"] if isinstance(table, dict) else table
    for r in rows:
        m = r["method"]
        if m == "llama-quantize --imatrix" or (m.startswith("qcompile") and "--method gptq" in m
                                                and "--max-size" not in m):
            donor = builds[r["build_key"]]["gguf"]
            label = f"{r['label'].split(' @')[0]}, experts only (rest F16)"
            argv += ["--external", f"{label}:splice:{sys.executable} {splice} {f16} {donor} {{out}}/experts-only.gguf "
                                   "--pattern _exps"]
    unseen_bench.main(argv)


if __name__ == "__main__":
    main()
