"""Resolve the MODEL argument to a local checkpoint directory.

Accepted forms, tried in this order: ``tiny`` (built locally); an existing directory; a size alias
(``7B``) with ``--family``; a Hugging Face repo id (``Qwen/Qwen2.5-7B-Instruct``) looked up in the
huggingface_hub cache first and downloaded only when online and allowed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from qcompile.errors import QCompileError, UsageError


@dataclass(frozen=True)
class Resolved:
    path: Path      # the checkpoint directory
    name: str       # a human name for outputs (repo name, directory name)
    source: str     # what the user asked for
    repo: str | None = None   # the hub repo id, when known (alias, repo id, or a hub-cache snapshot folder)

# Only the checkpoints Qwen actually published, per family.
FAMILIES: dict[str, dict[str, str]] = {
    "instruct": {s: f"Qwen/Qwen2.5-{s}-Instruct" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")},
    "base": {s: f"Qwen/Qwen2.5-{s}" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")},
    "coder": {s: f"Qwen/Qwen2.5-Coder-{s}-Instruct" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B")},
    "math": {s: f"Qwen/Qwen2.5-Math-{s}-Instruct" for s in ("1.5B", "7B", "72B")},
    "qwen3": {s: f"Qwen/Qwen3-{s}" for s in ("0.6B", "1.7B", "4B", "8B", "14B", "32B", "30B-A3B", "235B-A22B")},
}
# the mixture-of-experts releases: total-A-active sizes (Qwen2-57B-A14B; Qwen3's hybrid-thinking MoE and its
# 2507 instruct updates; Qwen3-Coder)
FAMILIES["instruct"] |= {"57B-A14B": "Qwen/Qwen2-57B-A14B-Instruct", "30B-A3B": "Qwen/Qwen3-30B-A3B-Instruct-2507",
                         "235B-A22B": "Qwen/Qwen3-235B-A22B-Instruct-2507"}
FAMILIES["base"] |= {"57B-A14B": "Qwen/Qwen2-57B-A14B", "30B-A3B": "Qwen/Qwen3-30B-A3B-Base"}
FAMILIES["coder"] |= {"30B-A3B": "Qwen/Qwen3-Coder-30B-A3B-Instruct", "480B-A35B": "Qwen/Qwen3-Coder-480B-A35B-Instruct"}
# the Qwen3.5 generation (linear-attention hybrids, published post-trained under the bare name): the sizes
# llama.cpp's qwen35 / qwen35moe loaders name (0.8B 2B 4B 9B 27B; 35B-A3B 122B-A10B 397B-A17B) and its
# converter's examples (Qwen/Qwen3.5-9B, Qwen/Qwen3.5-35B-A3B); Qwen3.6: the 27B its docs and tests load
# (ggml-org/Qwen3.6-27B-GGUF). Only those: no size is guessed.
FAMILIES["qwen3.5"] = {s: f"Qwen/Qwen3.5-{s}" for s in ("0.8B", "2B", "4B", "9B", "27B", "35B-A3B", "122B-A10B",
                                                       "397B-A17B")}
FAMILIES["qwen3.6"] = {"27B": "Qwen/Qwen3.6-27B"}
FAMILIES["qwen3-next"] = {"80B-A3B": "Qwen/Qwen3-Next-80B-A3B-Instruct"}
_SIZE = re.compile(r"^\d+(\.\d+)?[bB](-[aA]\d+(\.\d+)?[bB])?$")
_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "merges.txt", "vocab.json", "*.jinja", "tokenizer*"]


def alias_repo(size: str, family: str) -> str:
    """Map a size alias and family to the published repo id, or raise listing the valid choices."""
    if family not in FAMILIES:
        raise UsageError(f"unknown --family {family!r}; choose from {', '.join(FAMILIES)}")
    sizes = FAMILIES[family]
    key = size.upper()
    if key not in sizes:
        raise UsageError(f"Qwen did not publish a {key} {family} model; valid sizes for --family {family}: "
                         f"{' '.join(sizes)}")
    return sizes[key]


def hub_offline(flag: bool) -> bool:
    return flag or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def from_hub(repo: str, offline: bool) -> Path:
    """A snapshot of ``repo``: the local cache first, then (when allowed) a download of the needed files."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - a declared dependency
        raise QCompileError(f"model {repo!r}: huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        if hub_offline(offline):
            raise QCompileError(f"{repo!r} is not in the Hugging Face cache ({HF_HUB_CACHE}) and downloads "
                                f"are off (--offline or HF_HUB_OFFLINE=1)") from None
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise QCompileError(f"{repo!r} is not in the cache ({HF_HUB_CACHE}) and the download failed: {msg}") \
            from None


def cache_repo(path: Path) -> str | None:
    """The repo id of a huggingface_hub cache snapshot folder (``.../models--Org--Name/snapshots/REV``)."""
    p = path.resolve()
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        repo = p.parent.parent.name[len("models--"):].replace("--", "/", 1)
        if _REPO.match(repo):
            return repo
    return None


def resolve(model: str, *, family: str = "instruct", offline: bool = False) -> Resolved:
    """Find the checkpoint directory for ``model`` (see module docstring for the accepted forms)."""
    if model == "tiny":
        from qcompile import tiny
        return Resolved(tiny.build(), "tiny-qwen2.5", model)
    path = Path(model).expanduser()
    if path.is_dir():
        repo = cache_repo(path)
        # a hub-cache snapshot folder is named by its commit hash: name outputs after the repo instead
        return Resolved(path, repo.split("/")[-1] if repo else path.resolve().name, model, repo)
    if path.exists():
        raise QCompileError(f"{model}: is a file; expected a checkpoint directory")
    if _SIZE.match(model):
        repo = alias_repo(model, family)
        return Resolved(from_hub(repo, offline), repo.split("/")[-1], model, repo)
    if _REPO.match(model) and not model.startswith((".", "/", "~")):
        try:
            return Resolved(from_hub(model, offline), model.split("/")[-1], model, model)
        except QCompileError as e:
            raise QCompileError(f"model {model!r} not found: no directory ./{model}, and {e}") from None
    raise QCompileError(f"model {model!r} not found: no such directory, not a size alias "
                        f"({' '.join(FAMILIES['instruct'])}), not a hub repo id (org/name), not 'tiny'")
