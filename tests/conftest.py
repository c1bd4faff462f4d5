"""Shared fixtures: tiny random Qwen2 / Qwen2.5 / Qwen3 checkpoints built on the spot."""
from __future__ import annotations

import functools

import os
import sys
from pathlib import Path

import pytest

from qcompile import tiny
from qcompile.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_TOKENIZER = SHARED / "assets" / "qwen2.5-tokenizer"
REAL_MODEL = Path(os.environ.get("QCOMPILE_REAL_MODEL",
                                 Path.home() / ".cache" / "qcompile-test-assets" / "Qwen2.5-Coder-0.5B-Instruct"))

TINY_MODELS = tiny.VARIANTS  # name -> (architecture, config overrides, seed)
# the peer-side tooling the cross-checks share with the benchmarks (optimum's exporters in a side environment)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _tools import hf_logits, rel_error  # noqa: E402,F401 - the reference logits, shared with benchmarks/agreement.py


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: tiny.build_variant(name, root / name) for name in TINY_MODELS}


@pytest.fixture(params=list(TINY_MODELS))
def tiny_model(request, tiny_models) -> Path:
    return tiny_models[request.param]


def run_cli(*args: str) -> int:
    """Run ``qcompile`` in-process and return its exit status."""
    return main([str(a) for a in args])


def random_tokens(n: int = 64, seed: int = 0) -> list[int]:
    """Token ids within the tiny tokenizer's 768 (seeded)."""
    import numpy as np
    return np.random.default_rng(seed).integers(0, 760, n).tolist()


def compile_gguf(model, out, quant, *extra) -> Path:
    """``qcompile MODEL --quant QUANT --out OUT -q --no-verify ...``, asserted to succeed; the file written."""
    assert run_cli(model, "--quant", quant, "--out", out, "-q", "--no-verify", *extra) == 0
    return next(Path(out).glob(f"*-{quant}.gguf"))


def gguf_fields(path: Path) -> dict:
    """Key -> value of a GGUF's metadata (arrays as lists, strings as str), as gguf-py's ``contents()`` gives them."""
    return _summary(str(path), *_version(path))[0]


def gguf_shapes(path: Path) -> dict[str, tuple[list[int], str]]:
    """Tensor name -> (shape as gguf-py lists it, type name)."""
    return _summary(str(path), *_version(path))[1]


def _version(path: Path) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_mtime_ns, st.st_size


# GGUF value types -> struct formats (gguf-py's GGUFValueType numbering)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@functools.lru_cache(maxsize=16)
def _summary(path: str, mtime_ns: int, size: int) -> tuple[dict, dict]:
    """The header of a GGUF: metadata and tensor infos. Read here rather than by gguf-py's GGUFReader, which builds a
    memory-mapped view per array element: ten seconds for each file with Qwen's 152k-token vocabulary, read a dozen
    times by the converter tests; this walk takes a fraction of a second. Checked against GGUFReader in
    test_gguf_header_summary_equals_gguf_py."""
    import struct

    from gguf import GGMLQuantizationType
    with open(path, "rb") as f:
        buf = f.read(min(size, 64 << 20))   # the header: metadata + tensor infos (vocabularies are a few MB)
    pos = 0

    def take(fmt: str):
        nonlocal pos
        v = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        pos += n
        return buf[pos - n:pos].decode("utf-8", errors="surrogateescape")

    def value(kind: int):
        if kind == 8:
            return string()
        if kind == 9:
            item, n = take("<I"), take("<Q")
            return [value(item) for _ in range(n)]
        return take(_SCALARS[kind])

    assert buf[:4] == b"GGUF", path
    pos = 4
    take("<I")
    n_tensors, n_kv = take("<Q"), take("<Q")
    fields = {}
    for _ in range(n_kv):
        key = string()
        fields[key] = value(take("<I"))
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        kind = take("<I")
        take("<Q")
        tensors[name] = (dims, GGMLQuantizationType(kind).name)
    return fields, tensors


def gguf_types(path: Path) -> dict[str, str]:
    """Tensor name -> type name of a GGUF."""
    return {name: kind for name, (_, kind) in gguf_shapes(path).items()}


def calib_file(tmp_path: Path) -> Path:
    """The packaged text as a --calib file."""
    calib = tmp_path / "calib.txt"
    calib.write_text(tiny.builtin_text())
    return calib


def llama_cpp_converter() -> Path | None:
    """convert_hf_to_gguf.py from the llama-cpp-python sdist (benchmarks/_tools.py fetches it once); None when
    it cannot be had (no network for pip download): the tests that need it skip."""
    try:
        from _tools import llama_cpp_root
        return next(llama_cpp_root().glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    except Exception:  # noqa: BLE001
        return None


def real_tokenizer_dir(d: Path) -> Path:
    """A new folder ``d`` holding Qwen2.5's tokenizer (llama.cpp's converter knows real tokenizers only)."""
    import shutil
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REAL_TOKENIZER / f, d / f)
    return d


def f16_pair(d: Path, tmp_path: Path, *converter_flags: str) -> tuple[Path, Path, float, float]:
    """Our F16 of checkpoint ``d`` and convert_hf_to_gguf.py's (skips without the converter), and each one's
    logits error vs transformers on 48 seeded tokens: (ours, theirs, error of ours, error of theirs)."""
    import subprocess

    import numpy as np

    from qcompile import llama_worker
    conv = llama_cpp_converter()
    if conv is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not available (pip download of llama-cpp-python failed)")
    ours = compile_gguf(d, tmp_path / "ours", "F16")
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([sys.executable, conv, d, "--outtype", "f16", *converter_flags, "--outfile", theirs], check=True,
                   capture_output=True)
    tokens = np.random.default_rng(1).integers(0, 151000, 48).tolist()
    ref = hf_logits(d, tokens)
    return ours, theirs, rel_error(llama_worker.logits(ours, tokens), ref), \
        rel_error(llama_worker.logits(theirs, tokens), ref)


def run_interrupted(monkeypatch, *args, at: int = 2) -> int:
    """The CLI with the calibration engine interrupted (KeyboardInterrupt, as Ctrl-C) when it starts layer
    ``at``, after layers 0..at-1 are done; the engine is whole again afterwards. Returns the exit status."""
    from calibration import capture
    real = capture.LayerwiseEngine.layer

    def interrupted(self, i):
        if i == at and self.done == at - 1:
            raise KeyboardInterrupt
        return real(self, i)
    monkeypatch.setattr(capture.LayerwiseEngine, "layer", interrupted)
    try:
        return run_cli(*args)
    finally:
        monkeypatch.setattr(capture.LayerwiseEngine, "layer", real)


def requires_llama():
    from qcompile import llama_worker
    return pytest.mark.skipif(not llama_worker.available(), reason="llama-cpp-python is not installed")
