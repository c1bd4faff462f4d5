"""``qcompile run ARTIFACT "prompt"``: a quick generation in the artifact's own runtime.

GGUF files run in llama.cpp (llama-cpp-python, in a child process); ONNX folders in onnxruntime and
OpenVINO IR folders in OpenVINO, with the KV cache the graph carries. Greedy decoding, so the same artifact
always says the same thing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from qcompile.errors import EXIT_OK, QCompileError, guarded


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcompile run", description="Generate text from a compiled artifact in its own "
                                "runtime (GGUF: llama.cpp; ONNX folder: onnxruntime; OpenVINO IR folder: "
                                "OpenVINO), greedy.")
    p.add_argument("artifact", type=Path, metavar="ARTIFACT", help="a .gguf file, or a folder with model.onnx or "
                                                                       "openvino_model.xml")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as is (default: as a user message through "
                                                      "the model's chat template)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: all)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    def work() -> str:
        import exporters
        kind = exporters.for_artifact(args.artifact)
        if kind is None:
            raise QCompileError(f"{args.artifact}: not {exporters.describe().replace(', ', ' or ')}")
        return kind.generate(args.artifact, args.prompt, args.max_tokens, args.raw, args.threads)

    code, text = guarded("qcompile run", work)
    if code != EXIT_OK:
        return code
    print(text)
    return EXIT_OK
