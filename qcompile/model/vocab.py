"""The model's tokenizer as llama.cpp wants it: GPT-2-style byte-level BPE tokens, types and merges.

Read straight from ``tokenizer.json`` (no transformers import): the vocabulary is padded to the
model's ``vocab_size`` with ``[PAD{i}]`` UNUSED tokens, added tokens become CONTROL (special, or
shaped like ``<|...|>``) or USER_DEFINED — the same rules as llama.cpp's convert_hf_to_gguf.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf import SpecialVocab, TokenType

from qcompile.errors import QCompileError

REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    special: SpecialVocab  # merges, bos/eos/pad ids, chat template
    pre: str = "qwen2"     # llama.cpp's pre-tokenizer: qwen2, or qwen35 (Qwen3.5's regex also keeps marks \p{M})


def _looks_special(tok: str) -> bool:
    return tok.startswith("<|") and tok.endswith("|>")


def check_files(model_dir: Path) -> None:
    missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
    if missing:
        raise QCompileError(f"{model_dir}: missing tokenizer file(s) {', '.join(missing)} "
                            f"(llama.cpp needs the tokenizer inside the GGUF)")


def load_vocab(model_dir: Path, vocab_size: int) -> Vocab:
    """Build the GGUF token list for a Qwen byte-level BPE tokenizer."""
    check_files(model_dir)
    try:
        tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        model = tj["model"]
        if model.get("type") != "BPE":
            raise QCompileError(f"{model_dir}: tokenizer.json is a {model.get('type')} model; Qwen uses BPE")
        base: dict[str, int] = model["vocab"]
        added = {t["id"]: t for t in tj.get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QCompileError(f"{model_dir}/tokenizer.json: unreadable ({e.__class__.__name__}: {e})") from None
    by_id = {i: t for t, i in base.items()}
    tokens, types = [], []
    top = max([*by_id, *added], default=-1)
    if top >= vocab_size:
        raise QCompileError(f"{model_dir}: tokenizer has token id {top} but config vocab_size is {vocab_size}")
    for i in range(vocab_size):
        if i in added:
            tok = added[i]["content"]
            special = added[i].get("special", False) or _looks_special(tok)
            tokens.append(tok)
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    sv = SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    pre = "qwen35" if r"\p{M}" in json.dumps(tj.get("pre_tokenizer")).replace("\\\\", "\\") else "qwen2"
    if not sv.merges:
        raise QCompileError(f"{model_dir}: tokenizer has no BPE merges")
    # Qwen never prepends BOS; say so explicitly so every runtime agrees.
    sv.add_special_token.pop("bos", None)
    return Vocab(tokens, [int(t) for t in types], sv, pre)
