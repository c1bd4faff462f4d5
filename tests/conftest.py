"""Shared fixtures: tiny random Qwen2 / Qwen2.5 / Qwen3 checkpoints built on the spot."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from qcompile import tiny
from qcompile.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_TOKENIZER = SHARED / "assets" / "qwen2.5-tokenizer"
REAL_MODEL = Path(os.environ.get("QCOMPILE_REAL_MODEL",
                                 Path.home() / ".cache" / "qcompile-test-assets" / "Qwen2.5-Coder-0.5B-Instruct"))

# name -> (architecture, config overrides)
TINY_MODELS = {
    "qwen2": ("qwen2", dict(tie_word_embeddings=False)),                 # untied, qkv bias
    "qwen2.5": ("qwen2", dict(tie_word_embeddings=True)),                # tied, qkv bias
    "qwen3": ("qwen3", dict(tie_word_embeddings=False, head_dim=128)),  # q/k norm, head_dim != hidden/heads
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for i, (name, (arch, over)) in enumerate(TINY_MODELS.items()):
        d = root / name
        d.mkdir()
        tiny.build_tokenizer(d)
        tiny.build_model(d, arch=arch, seed=10 + i, **over)
        out[name] = d
    return out


@pytest.fixture(params=list(TINY_MODELS))
def tiny_model(request, tiny_models) -> Path:
    return tiny_models[request.param]


def run_cli(*args: str) -> int:
    """Run ``qcompile`` in-process and return its exit status."""
    return main([str(a) for a in args])


def hf_logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    """Reference logits from transformers (float32) for one sequence."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def requires_llama():
    from qcompile import llama_worker
    return pytest.mark.skipif(not llama_worker.available(), reason="llama-cpp-python is not installed")
