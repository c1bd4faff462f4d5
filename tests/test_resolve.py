"""MODEL resolution: directories, size aliases per family, hub ids offline."""
from __future__ import annotations

import pytest

from qcompile.errors import QCompileError, UsageError
from qcompile.resolve import FAMILIES, alias_repo, resolve


@pytest.mark.parametrize("size,family,repo", [
    ("7B", "instruct", "Qwen/Qwen2.5-7B-Instruct"), ("0.5b", "base", "Qwen/Qwen2.5-0.5B"),
    ("32B", "coder", "Qwen/Qwen2.5-Coder-32B-Instruct"), ("1.5B", "math", "Qwen/Qwen2.5-Math-1.5B-Instruct"),
    ("8B", "qwen3", "Qwen/Qwen3-8B"),
    # the MoE releases
    ("30B-A3B", "qwen3", "Qwen/Qwen3-30B-A3B"), ("30b-a3b", "coder", "Qwen/Qwen3-Coder-30B-A3B-Instruct"),
    ("235B-A22B", "qwen3", "Qwen/Qwen3-235B-A22B"), ("480B-A35B", "coder", "Qwen/Qwen3-Coder-480B-A35B-Instruct"),
    ("30B-A3B", "instruct", "Qwen/Qwen3-30B-A3B-Instruct-2507"), ("57B-A14B", "base", "Qwen/Qwen2-57B-A14B"),
    # the Qwen3.5 / 3.6 hybrids
    ("9B", "qwen3.5", "Qwen/Qwen3.5-9B"), ("0.8b", "qwen3.5", "Qwen/Qwen3.5-0.8B"),
    ("35B-A3B", "qwen3.5", "Qwen/Qwen3.5-35B-A3B"), ("27B", "qwen3.6", "Qwen/Qwen3.6-27B"),
])
def test_alias(size, family, repo):
    assert alias_repo(size, family) == repo


@pytest.mark.parametrize("size,family", [("72B", "coder"), ("0.5B", "math"), ("7B", "qwen3"), ("3B", "math"),
                                         ("480B-A35B", "qwen3"), ("57B-A14B", "coder")])
def test_unpublished_combination(size, family):
    with pytest.raises(UsageError) as e:
        alias_repo(size, family)
    assert " ".join(FAMILIES[family]) in str(e.value)


def test_hub_id_offline_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(QCompileError) as e:
        resolve("Qwen/Qwen2.5-0.5B-Instruct", offline=True)
    msg = str(e.value)
    assert "not in the Hugging Face cache" in msg and "offline" in msg.lower() and "\n" not in msg


def test_directory(tiny_models):
    r = resolve(str(tiny_models["qwen3"]))
    assert r.path == tiny_models["qwen3"] and r.name == "qwen3"
