"""``qcompile run ARTIFACT "prompt"``: a quick generation in the artifact's own runtime.

GGUF files run in llama.cpp (llama-cpp-python, in a child process); ONNX folders in onnxruntime with
the KV cache the graph carries. Greedy decoding, so the same artifact always says the same thing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from qcompile.errors import EXIT_OK, QCompileError, guarded


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcompile run", description="Generate text from a compiled artifact in its own "
                                "runtime (GGUF: llama.cpp; ONNX folder: onnxruntime), greedy.")
    p.add_argument("artifact", type=Path, metavar="ARTIFACT", help="a .gguf file, or a folder with model.onnx")
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


def generate_onnx(folder: Path, prompt: str, max_tokens: int, raw: bool, threads: int | None) -> str:
    import json

    import onnxruntime as ort
    from tokenizers import Tokenizer
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
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    past = [np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in pasts]
    cur, start, new = np.asarray([ids], np.int64), 0, []
    for _ in range(max_tokens):
        n = start + cur.shape[1]
        feed = {"input_ids": cur, "attention_mask": np.ones((1, n), np.int64),
                "position_ids": np.arange(start, n, dtype=np.int64)[None]}
        feed.update({i.name: p for i, p in zip(pasts, past)})
        res = dict(zip(outs, sess.run(None, feed)))
        nxt = int(res["logits"][0, -1].argmax())
        if nxt in stop:
            break
        new.append(nxt)
        past = [res[o] for o in outs[1:]]
        cur, start = np.asarray([[nxt]], np.int64), n
    return tok.decode(new, skip_special_tokens=True)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from qcompile import llama_worker

    def work() -> str:
        a = args.artifact
        if a.is_dir() and (a / "model.onnx").is_file():
            return generate_onnx(a, args.prompt, args.max_tokens, args.raw, args.threads)
        if a.is_file() and a.suffix.lower() == ".gguf":
            if not llama_worker.available():
                raise QCompileError("running a GGUF needs llama-cpp-python (pip install 'qcompile[llama]')")
            try:
                return llama_worker.generate(a, args.prompt, args.max_tokens, chat=not args.raw, threads=args.threads)
            except RuntimeError as e:
                raise QCompileError(f"llama.cpp could not run {a} ({e})") from None
        raise QCompileError(f"{a}: not a .gguf file or a folder with model.onnx")

    code, text = guarded("qcompile run", work)
    if code != EXIT_OK:
        return code
    print(text)
    return EXIT_OK
