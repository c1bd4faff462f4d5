"""Shared helpers for benchmarks: llama.cpp's own tools (the peers), timing and peak RSS of a command.

The tools are built from the llama.cpp sources vendored in llama-cpp-python's sdist (same version
as the installed judge), once, into ~/.cache/qcompile/llama.cpp-<version>/build. Never committed.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# AVX2 baseline, as for llama-cpp-python (see README: -march=native can SIGILL on AMX-advertising VMs)
CMAKE_FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
               "-DGGML_BMI2=ON", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
               "-DCMAKE_BUILD_TYPE=Release"]
TARGETS = ["llama-quantize", "llama-perplexity", "llama-imatrix"]
SHARED = Path(__file__).resolve().parents[2] / "shared"


def machine() -> str:
    """What the rows ran on, for cache keys and table headers: CPU model, core count and the instruction
    sets that change the result (bfloat16 in hardware picks qcompile's compute dtype, so both the timings
    and the calibrated bytes differ between an AVX2-only and an AMX machine)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {'+'.join(isa) or 'no avx2'}"


def llama_cpp_root() -> Path:
    ver = metadata.version("llama_cpp_python")
    root = Path(os.environ.get("QCOMPILE_CACHE", Path.home() / ".cache" / "qcompile")) / f"llama.cpp-{ver}"
    src = root / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp"
    if not src.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={ver}", "-d", str(root)], check=True)
        with tarfile.open(next(root.glob("llama_cpp_python-*.tar.gz"))) as t:
            t.extractall(root, filter="data")
    return root


def tools() -> dict[str, Path]:
    """Paths of llama-quantize, llama-perplexity, llama-imatrix (built if missing) and convert_hf_to_gguf.py."""
    root = llama_cpp_root()
    src = next(root.glob("llama_cpp_python-*/vendor/llama.cpp"))
    build = root / "build"
    bins = {t: build / "bin" / t for t in TARGETS}
    if not all(p.exists() for p in bins.values()):
        print(f"building {', '.join(TARGETS)} from {src} (several minutes) ...", file=sys.stderr)
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", *TARGETS, f"-j{os.cpu_count()}"], check=True,
                       stdout=subprocess.DEVNULL)
    return {"quantize": bins["llama-quantize"], "perplexity": bins["llama-perplexity"],
            "imatrix": bins["llama-imatrix"], "convert": src / "convert_hf_to_gguf.py"}


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    output: str


def measure(cmd: list[str], env: dict | None = None) -> Run:
    """Run ``cmd``; wall time and the child's peak RSS (GNU time), raising with its output on failure."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "QCOMPILE_MAXRSS_KB=%M", *map(str, cmd)], capture_output=True,
                       text=True, env={**os.environ, **(env or {})})
    dt = time.perf_counter() - t0
    out = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}):\n{out[-3000:]}")
    kb = int(re.findall(r"QCOMPILE_MAXRSS_KB=(\d+)", out)[-1])
    return Run(dt, kb / 1024, out)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def commit() -> str:
    """The repository's HEAD as a short id, ``+dirty`` when the code folders have uncommitted changes: the
    label every result row carries, so a table never mixes code versions unseen."""
    repo = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short=7", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "qcompile", "quantizers", "calibration", "exporters")
    return head + ("+dirty" if dirty else "")


def folder_quality(model: Path, folder: Path, text: Path, threads: int) -> dict:
    """``qcompile eval`` of an ONNX/OpenVINO folder on ``text`` (512-token windows, 3072 tokens) in its own
    runtime, cached beside the folder under the text's hash: the runtime's metrics (KLD, PPL, top-1)."""
    import hashlib
    import json
    out = folder / f"eval-{hashlib.sha256(text.read_bytes()).hexdigest()[:12]}-c512-t3072.json"
    if not out.exists():
        measure(["qcompile", "eval", model, "--artifact", folder, "--text", text, "--ctx", 512, "--max-tokens", 3072,
                 "--threads", threads, "--json", out, "-q"])
    (runtime,) = json.loads(out.read_text())["results"].values()
    return runtime


def hf_logits(model_dir: Path, tokens: list[int]):
    """Reference logits from transformers (float32) for one sequence (the tests' and agreement.py's reference)."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def rel_error(a, b) -> float:
    import numpy as np
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
