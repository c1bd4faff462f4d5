"""Shared fixtures: tiny random Qwen2 / Qwen2.5 / Qwen3 checkpoints built on the spot."""
from __future__ import annotations

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


def requires_llama():
    from qcompile import llama_worker
    return pytest.mark.skipif(not llama_worker.available(), reason="llama-cpp-python is not installed")
