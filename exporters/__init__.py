"""Exporters: one :class:`~exporters.target.Target` per output format, in one registry (``TARGETS``).

A target lays quantized tensors out in its runtime's format, never re-quantizing, and answers everything
else that differs between formats (types, naming, verification, report fields, running the artifact). The
compile pipeline, ``qcompile eval`` and ``qcompile run`` find targets here: by ``--to`` name (:func:`get`) or
by what an artifact on disk is (:func:`for_artifact`). A new format is one module that registers its class,
imported below.
"""
from __future__ import annotations

from exporters import gguf, onnx, openvino  # noqa: F401 - each registers its target
from exporters.target import TARGETS, Output, Target, for_artifact, get

__all__ = ["TARGETS", "Output", "Target", "for_artifact", "get", "describe"]


def describe() -> str:
    """What the known artifacts look like, for error messages ("a .gguf file, a folder with model.onnx, ...")."""
    return ", ".join(t.looks_like for t in TARGETS.values())
