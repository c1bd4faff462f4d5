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


def _chat_prompt(tokenizer_dir: Path, prompt: str) -> str:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not tok.chat_template:
        return prompt
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def generate_folder(folder: Path, prompt: str, max_tokens: int, raw: bool, threads: int | None) -> str:
    """Greedy generation from an ONNX or OpenVINO folder in its runtime, with the graph's KV cache."""
    import json

    from tokenizers import Tokenizer

    from exporters import folder_runner
    text = prompt if raw else _chat_prompt(folder, prompt)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    if not ids:
        raise QCompileError("the prompt is empty")
    stop = set()
    for name in ("generation_config.json", "config.json"):
        if (folder / name).is_file():
            eos = json.loads((folder / name).read_text()).get("eos_token_id")
            stop |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    try:
        runner = folder_runner(folder, threads)
    except Exception as e:  # onnxruntime / openvino raise their own exception types
        raise QCompileError(f"could not load {folder} ({e})") from None
    return tok.decode(runner.generate(ids, max_tokens, stop), skip_special_tokens=True)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from exporters import folder_runtime
    from qcompile import llama_worker

    def work() -> str:
        a = args.artifact
        if a.is_dir() and folder_runtime(a):
            return generate_folder(a, args.prompt, args.max_tokens, args.raw, args.threads)
        if a.is_file() and a.suffix.lower() == ".gguf":
            if not llama_worker.available():
                raise QCompileError("running a GGUF needs llama-cpp-python (pip install 'qcompile[llama]')")
            try:
                return llama_worker.generate(a, args.prompt, args.max_tokens, chat=not args.raw, threads=args.threads)
            except RuntimeError as e:
                raise QCompileError(f"llama.cpp could not run {a} ({e})") from None
        raise QCompileError(f"{a}: not a .gguf file or a folder with model.onnx / openvino_model.xml")

    code, text = guarded("qcompile run", work)
    if code != EXIT_OK:
        return code
    print(text)
    return EXIT_OK
