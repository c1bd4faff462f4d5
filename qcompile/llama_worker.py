"""Run llama.cpp (llama-cpp-python) in a child process.

Why a separate process: llama-cpp-python ships its own ``libggml-base.so`` with the same soname as
the one our quantizers load from ``libggml-python``; in one process the dynamic linker would reuse
whichever came first and the other fails with missing symbols. A child process keeps the judge
independent of the quantizer, and a crash in the runtime cannot take the compile down with it.

Protocol: one JSON request on stdin, ``{"op": ..., ...}``; results go to the ``out`` path it names.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _logits(req: dict) -> None:
    import llama_cpp
    tokens = req["tokens"]
    n = max(len(tokens), 8)
    llm = llama_cpp.Llama(model_path=req["model"], n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True,
                          verbose=False, type_k=0, type_v=0, n_threads=req.get("threads"), n_gpu_layers=0)
    llm.eval(tokens)
    np.save(req["out"], np.array(llm.scores[: len(tokens)], dtype=np.float32))
    llm.close()


def _tokenize(req: dict) -> None:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=req["model"], vocab_only=True, verbose=False)
    out = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=req.get("special", True)) for t in req["texts"]]
    Path(req["out"]).write_text(json.dumps(out))


def _quantize(req: dict) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(req["ftype"])
    params.nthread = int(req.get("threads") or 0)
    params.pure = bool(req.get("pure", False))
    rc = llama_cpp.llama_model_quantize(req["model"].encode(), req["out"].encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")


def _generate(req: dict) -> None:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=req["model"], n_ctx=2048, verbose=False, n_threads=req.get("threads"),
                          n_gpu_layers=0, seed=0)
    if req.get("chat"):
        out = llm.create_chat_completion([{"role": "user", "content": req["prompt"]}], max_tokens=req["max_tokens"],
                                         temperature=0.0)
        text = out["choices"][0]["message"]["content"]
    else:
        text = llm.create_completion(req["prompt"], max_tokens=req["max_tokens"], temperature=0.0)["choices"][0]["text"]
    Path(req["out"]).write_text(text, encoding="utf-8")
    llm.close()


OPS = {"logits": _logits, "tokenize": _tokenize, "quantize": _quantize, "generate": _generate}


def call(op: str, timeout: float = 1800, **req: Any) -> None:
    """Run one request in a child interpreter; raise RuntimeError with its stderr tail on failure."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "qcompile.llama_worker"], input=json.dumps({"op": op, **req}),
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise RuntimeError(f"llama.cpp {op} failed: {tail[0]}")


def logits(model: Path, tokens: list[int], threads: int | None = None) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "logits.npy"
        call("logits", model=str(model), tokens=[int(t) for t in tokens], threads=threads, out=str(out))
        return np.load(out)


def tokenize(model: Path, texts: list[str], special: bool = True) -> list[list[int]]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "tokens.json"
        call("tokenize", model=str(model), texts=texts, special=special, out=str(out))
        return json.loads(out.read_text())


def quantize(src: Path, dst: Path, ftype: int, threads: int | None = None, pure: bool = False) -> None:
    """llama.cpp's own ``llama_model_quantize`` (what the llama-quantize tool runs)."""
    call("quantize", model=str(src), out=str(dst), ftype=int(ftype), threads=threads, pure=pure)


def generate(model: Path, prompt: str, max_tokens: int, chat: bool = True, threads: int | None = None) -> str:
    """Greedy completion (or chat reply, with the GGUF's chat template) from llama.cpp."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "text.txt"
        call("generate", model=str(model), prompt=prompt, max_tokens=max_tokens, chat=chat, threads=threads,
             out=str(out))
        return out.read_text(encoding="utf-8")


def available() -> bool:
    try:
        import importlib.util
        return importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):
        return False


if __name__ == "__main__":
    request = json.loads(sys.stdin.read())
    OPS[request["op"]](request)
