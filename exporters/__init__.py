"""Exporters lay quantized tensors out in a runtime's format; ``EXPORTERS`` is the one registry."""
from __future__ import annotations

from exporters.gguf import write_gguf

EXPORTERS = {"gguf": write_gguf}

__all__ = ["EXPORTERS", "write_gguf"]
