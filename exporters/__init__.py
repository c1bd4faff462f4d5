"""Exporters lay quantized tensors out in a runtime's format; ``EXPORTERS`` is the one registry."""
from __future__ import annotations

from pathlib import Path

from exporters.gguf import write_gguf
from exporters.onnx import write_onnx
from exporters.openvino import write_openvino

EXPORTERS = {"gguf": write_gguf, "onnx": write_onnx, "openvino": write_openvino}


def folder_runtime(path: Path) -> str | None:
    """The runtime of a folder artifact: "onnxruntime" (model.onnx), "openvino" (openvino_model.xml), or None."""
    from exporters.onnx import ONNX_FILE
    from exporters.openvino import XML_FILE
    if (path / ONNX_FILE).is_file():
        return "onnxruntime"
    if (path / XML_FILE).is_file():
        return "openvino"
    return None


def folder_runner(path: Path, threads: int | None = None):
    """A runner (``.logits(tokens)``, ``.generate(ids, max_tokens, stop)``) over a folder artifact, in its own
    runtime (OpenVINO with the precise settings verification uses)."""
    kind = folder_runtime(path)
    if kind == "onnxruntime":
        from exporters.onnx import ONNX_FILE, Runner
        return Runner(path / ONNX_FILE, threads)
    if kind == "openvino":
        from exporters.openvino import Runner as OVRunner
        return OVRunner(path, threads)
    raise ValueError(f"{path}: no model.onnx or openvino_model.xml")


__all__ = ["EXPORTERS", "folder_runner", "folder_runtime", "write_gguf", "write_onnx", "write_openvino"]
