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


TOP_K = 2048  # the most candidates a draw keeps (top-p within the top 2048 tokens)


def nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """The token ids a draw chooses from, most probable first (ties by id): the smallest set holding
    ``top_p`` of the mass of ``p`` (unnormalised probabilities), within the :data:`TOP_K` most probable.

    Why the cap: a real model's nucleus is a few hundred tokens; where it is wider the model is unsure and
    the long tail is noise, and sorting a 150k vocabulary per draw dominated sampling on flat distributions
    (7 ms per draw even with a vectorised sort, 60-70 s of a 0.5B self-calibration)."""
    head = np.argpartition(-p, TOP_K)[:TOP_K] if p.size > TOP_K else np.arange(p.size)
    order = head[np.argsort(-p[head], kind="stable")]
    cum = np.cumsum(p[order]) / p.sum()
    return order[: int(np.searchsorted(cum, top_p)) + 1]


def _sample(req: dict) -> None:
    """Seeded sampling of many continuations at once: one token of every sequence per ``llama_decode``.

    Why the low-level API: llama-cpp-python's ``Llama`` decodes one sequence at a time; self-calibration
    needs dozens of continuations, and decoding them together runs at batch speed instead of
    single-stream speed. Sampling is done here in NumPy with a seeded generator, so the tokens depend only
    on the logits and the seed (llama.cpp's CPU kernels give the same logits for any thread count).
    """
    import llama_cpp as L
    prompts: list[list[int]] = req["prompts"]
    length, n = int(req["length"]), len(req["prompts"])
    rng = np.random.default_rng(req["seed"])
    temp, top_p = float(req["temperature"]), float(req["top_p"])
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_mmap = True  # the weights stay in the page cache: the file is the memory, not a copy of it
    model = L.llama_model_load_from_file(req["model"].encode(), mp)
    if not model:
        raise SystemExit(f"cannot load {req['model']}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    # a sample never ends early: end-of-generation tokens are never drawn
    eog = np.array([L.llama_vocab_is_eog(vocab, t) for t in range(n_vocab)], dtype=bool)
    cp = L.llama_context_default_params()
    cp.n_seq_max = n
    # a cache stream per sequence (n_ctx split evenly): each token attends over its own sequence's cache;
    # one unified cache made every step attend over all n sequences' slots, masked (real 0.5B, 32 x 256
    # tokens: 133 s unified, 122 s split, the same tokens)
    cp.kv_unified = False
    cp.n_ctx = n * (max(length, max(len(p) for p in prompts)) + 16)
    cp.n_batch = cp.n_ubatch = max(n, max(len(p) for p in prompts))
    cp.n_threads = cp.n_threads_batch = int(req.get("threads") or os.cpu_count() or 1)
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("cannot create a llama.cpp context")
    batch = L.llama_batch_init(cp.n_batch, 0, 1)

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        """items: (sequence, position, token, wants logits)."""
        for k, (s, pos, tok, want) in enumerate(items):
            batch.token[k], batch.pos[k], batch.n_seq_id[k] = tok, pos, 1
            batch.seq_id[k][0], batch.logits[k] = s, want
        batch.n_tokens = len(items)
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise SystemExit(f"llama_decode failed with {rc}")

    def draw(row: int) -> int:
        """Temperature + nucleus (top-p) sampling from the logits of batch row ``row``."""
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, row), shape=(n_vocab,))
        z = logits.astype(np.float64) / temp
        z[eog] = -np.inf
        p = np.exp(z - z.max())
        keep = nucleus(p, top_p)
        return int(rng.choice(keep, p=p[keep] / p[keep].sum()))

    out = [list(p[:length]) for p in prompts]
    for s, p in enumerate(prompts):  # each prompt alone (they are short), then its first draw
        decode([(s, pos, tok, pos == len(p) - 1) for pos, tok in enumerate(p)])
        out[s].append(draw(len(p) - 1))
    while active := [s for s in range(n) if len(out[s]) < length]:
        decode([(s, len(out[s]) - 1, out[s][-1], True) for s in active])
        for k, s in enumerate(active):
            out[s].append(draw(k))
    np.save(req["out"], np.array([o[:length] for o in out], dtype=np.int64))
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)


OPS = {"logits": _logits, "tokenize": _tokenize, "quantize": _quantize, "generate": _generate, "sample": _sample}


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


def sample(model: Path, prompts: list[list[int]], length: int, *, seed: int, temperature: float, top_p: float,
           threads: int | None = None, timeout: float = 24 * 3600) -> np.ndarray:
    """[len(prompts), length] token ids: each prompt continued by seeded sampling to ``length`` tokens
    (end-of-generation tokens never drawn). See :func:`_sample`."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "tokens.npy"
        call("sample", timeout=timeout, model=str(model), prompts=[[int(t) for t in p] for p in prompts],
             length=length, seed=seed, temperature=temperature, top_p=top_p, threads=threads,
             out=str(out))
        return np.load(out)


def available() -> bool:
    try:
        import importlib.util
        return importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):
        return False


if __name__ == "__main__":
    request = json.loads(sys.stdin.read())
    OPS[request["op"]](request)
