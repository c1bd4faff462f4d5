"""report.json as types: one dataclass per section, one builder, and the JSON Schema generated from them.

The compile builds a :class:`Report` (its target contributes the ``target`` / ``artifact`` / ``tensors``
sections); :meth:`Report.to_dict` is what report.json holds; :meth:`Report.from_dict` reads any
``schema_version`` 1 or 2 file back (unknown keys are ignored, absent ones read as None), and
``qcompile report``, ``qcompile check``, the compile's quality gate and the packaging read these objects.
:func:`json_schema` derives the schema from the same classes; it ships as ``qcompile/data/report.schema.json``
(a test keeps the file equal to the classes) and ``docs/report-schema.md`` explains each key.

Field metadata: ``omit`` - left out of report.json when None (a section only some formats or options have);
without it a None value is written as ``null`` (nullable).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

SCHEMA_VERSION = 2  # 2: tensors[].rel_error (docs/report-schema.md)
OMIT = {"omit": True}


@dataclass
class Tool:
    name: str = "qcompile"
    command: list[str] = field(default_factory=list)


@dataclass
class ModelInfo:
    source: str = ""
    path: str = ""
    name: str = ""
    architecture: str = ""
    parameters: int = 0
    layers: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    tied_embeddings: bool = False


@dataclass
class TargetInfo:
    """The output format and its quantization; the optional keys belong to some formats only."""
    format: str = ""
    scheme: str = ""
    method: str = ""
    pure: bool | None = field(default=None, metadata=OMIT)               # gguf
    file_type: int | None = field(default=None, metadata=OMIT)           # gguf
    base_scheme: str | None = field(default=None, metadata=OMIT)         # gguf with a size budget
    bits: int | None = field(default=None, metadata=OMIT)                # onnx, openvino
    group_size: int | None = field(default=None, metadata=OMIT)
    symmetric: bool | None = field(default=None, metadata=OMIT)
    lm_head: str | None = field(default=None, metadata=OMIT)
    embeddings: str | None = field(default=None, metadata=OMIT)
    opset: str | None = field(default=None, metadata=OMIT)               # onnx
    activations: str | None = field(default=None, metadata=OMIT)
    openvino: str | None = field(default=None, metadata=OMIT)            # openvino
    verified_with: str | None = field(default=None, metadata=OMIT)


@dataclass
class ArtifactFile:
    path: str = ""
    bytes: int = 0
    sha256: str = ""


@dataclass
class Artifact:
    path: str = ""
    bytes: int = 0
    bits_per_weight: float = 0.0
    sha256: str | None = field(default=None, metadata=OMIT)              # gguf
    files: list[ArtifactFile] | None = field(default=None, metadata=OMIT)  # folders


@dataclass
class TensorRecord:
    name: str = ""
    type: str = ""
    shape: list[int] = field(default_factory=list)
    bytes: int = 0
    rel_error: float | None = None   # v2; null when not measured or undefined


@dataclass
class ReferenceMetrics:
    """Full precision vs the quantized model, both in PyTorch, on the evaluation text."""
    tokens: int = 0
    windows: int = 0
    ctx: int = 0
    ppl_fp: float = 0.0
    ppl_quant: float = 0.0
    kld_mean: float = 0.0
    kld_p99: float = 0.0
    top1: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ArtifactMetrics:
    """The artifact in its runtime vs the dequantized PyTorch model."""
    runtime: str = ""
    tokens: int = 0
    rel_error: float = 0.0
    top1: float = 0.0
    max_abs_error: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Metrics:
    """``{}`` with --no-verify; else the reference path and the runtime's (null without its runtime)."""
    reference: ReferenceMetrics | None = field(default=None, metadata=OMIT)
    artifact: ArtifactMetrics | None = field(default=None, metadata={"omit_with": "reference"})


@dataclass
class ExpertCoverage:
    """One MoE layer's calibration coverage: per routed expert, the calibration tokens its full-precision
    router sent it, the weight per token of the layer's other tokens its statistics were blended with (0: its
    own tokens only; an expert no token reached uses the layer's), and the method that rounded it (the run's,
    or ``imatrix`` for an expert with fewer tokens than its input width: never left uncalibrated)."""
    layer: int = 0
    tokens: list[int] = field(default_factory=list)
    blend: list[float] = field(default_factory=list)
    method: list[str] = field(default_factory=list)


@dataclass
class Gate:
    baseline: str | None = None
    passed: list[str] = field(default_factory=list)


@dataclass
class Report:
    """One compile's record (docs/report-schema.md)."""
    schema_version: int = SCHEMA_VERSION
    tool: Tool = field(default_factory=Tool)
    model: ModelInfo = field(default_factory=ModelInfo)
    target: TargetInfo = field(default_factory=TargetInfo)
    calibration: str | None = None
    artifact: Artifact = field(default_factory=Artifact)
    tensor_types: dict[str, int] | None = field(default=None, metadata=OMIT)   # gguf
    tensors: list[TensorRecord] = field(default_factory=list)
    allocation: dict[str, Any] | None = field(default=None, metadata=OMIT)     # a size budget's choices
    experts: list[ExpertCoverage] | None = field(default=None, metadata=OMIT)  # a calibrated MoE run
    metrics: Metrics = field(default_factory=Metrics)
    gate: Gate | None = field(default=None, metadata=OMIT)
    timings_s: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)
    package: dict[str, Any] | None = field(default=None, metadata=OMIT)        # --package

    def to_dict(self) -> dict[str, Any]:
        return _encode(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        return _decode(cls, data)


# ---- encoding, decoding, schema -------------------------------------------------------------------------------

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _encode(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None and (f.metadata.get("omit") or
                                  ("omit_with" in f.metadata and getattr(obj, f.metadata["omit_with"]) is None)):
                continue
            out[f.name] = _encode(value)
        return out
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    return obj


def _args(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Union[tuple(rest)]), True
    return tp, False


def _decode(tp: Any, value: Any) -> Any:
    tp, _ = _args(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            return value
        hints = _hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        obj = tp(**{k: _decode(hints[k], v) for k, v in value.items() if k in known})
        for name in known - set(value):  # absent in the file: None, not a default that reads like a measurement
            setattr(obj, name, None)
        return obj
    if typing.get_origin(tp) is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        return [_decode(item, v) for v in value]
    return value


_JSON = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    tp, nullable = _args(tp)
    if dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # recursion guard
            hints = _hints(tp)
            props = {f.name: _schema(hints[f.name], defs) for f in dataclasses.fields(tp)}
            required = [f.name for f in dataclasses.fields(tp) if not f.metadata]
            defs[tp.__name__] = {"type": "object", "description": (tp.__doc__ or "").split("\n")[0],
                                 "properties": props, "required": required}
        s: dict[str, Any] = {"$ref": f"#/$defs/{tp.__name__}"}
    elif typing.get_origin(tp) is list:
        s = {"type": "array", "items": _schema(typing.get_args(tp)[0], defs)}
    elif typing.get_origin(tp) is dict:
        s = {"type": "object", "additionalProperties": _schema(typing.get_args(tp)[1], defs)}
    elif tp is Any:
        s = {}
    elif tp is float:
        s = {"type": "number"}
    else:
        s = {"type": _JSON[tp]}
    return {"anyOf": [s, {"type": "null"}]} if nullable else s


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of report.json, derived from :class:`Report`."""
    defs: dict[str, Any] = {}
    top = _schema(Report, defs)
    root = defs.pop("Report")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "qcompile/report.schema.json",
            "title": f"qcompile report.json (schema_version {SCHEMA_VERSION})", **{k: v for k, v in root.items()
                                                                                      if k != "description"},
            "$defs": defs} if top else {}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=1) + "\n"
