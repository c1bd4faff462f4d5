"""Sizes as people write them on a command line: ``491400096``, ``468.6MiB``, ``0.49GB``.

Shared by ``qcompile --max-size`` (a size budget for the GGUF) and ``qcompile check --max-size`` (a size
ceiling for a CI gate), so both accept the same spellings.
"""
from __future__ import annotations

import math
import re

from qcompile.errors import QCompileError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)")


def parse_size(text: str, what: str) -> int:
    """Bytes in ``text`` (a number with an optional unit: B, KB, MB, GB, KiB, MiB, GiB), rounded down:
    a budget of ``0.49GB`` allows 490000000 bytes, never one more. ``what`` names the option in errors."""
    m = _SIZE.fullmatch(text.strip())
    if not m or m.group(2).upper() not in UNITS:
        raise QCompileError(f"{what} {text!r}: expected a size in bytes, optionally with a unit "
                            f"(468.6MiB, 0.49GB, 491400096)")
    return math.floor(float(m.group(1)) * UNITS[m.group(2).upper()])
