"""Exporters lay quantized tensors out in a runtime's format; ``EXPORTERS`` is the one registry."""
from __future__ import annotations

from exporters.gguf import write_gguf
from exporters.onnx import write_onnx

EXPORTERS = {"gguf": write_gguf, "onnx": write_onnx}

__all__ = ["EXPORTERS", "write_gguf", "write_onnx"]
