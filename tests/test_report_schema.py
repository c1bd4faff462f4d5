"""report.json is typed: the dataclasses of qcompile.report_types build it, read it back, and generate the JSON
Schema that ships in the package; a real compile's report satisfies that schema."""
from __future__ import annotations

import json
from importlib import resources

import pytest

from conftest import run_cli
from qcompile.report_types import SCHEMA_VERSION, Report, json_schema, schema_text

_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list,
          "null": type(None)}


def violations(value, schema: dict, root: dict, where: str = "$") -> list[str]:
    """The places where ``value`` breaks ``schema`` (the subset json_schema emits: $ref, type, properties,
    required, items, additionalProperties, anyOf)."""
    if "$ref" in schema:
        return violations(value, root["$defs"][schema["$ref"].rsplit("/", 1)[-1]], root, where)
    if "anyOf" in schema:
        return [] if any(not violations(value, s, root, where) for s in schema["anyOf"]) else [f"{where}: no match"]
    out = []
    t = schema.get("type")
    if t and (not isinstance(value, _TYPES[t]) or (t in ("integer", "number") and isinstance(value, bool))):
        return [f"{where}: {type(value).__name__} is not {t}"]
    if t == "object":
        for key in schema.get("required", []):
            if key not in value:
                out.append(f"{where}: missing {key}")
        props = schema.get("properties")
        for key, v in value.items():
            if props is not None:
                out += [f"{where}.{key}: unknown key"] if key not in props else violations(v, props[key], root,
                                                                                           f"{where}.{key}")
            elif "additionalProperties" in schema:
                out += violations(v, schema["additionalProperties"], root, f"{where}.{key}")
    if t == "array":
        for i, v in enumerate(value):
            out += violations(v, schema["items"], root, f"{where}[{i}]")
    return out


def test_the_shipped_schema_is_the_one_the_types_generate():
    shipped = resources.files("qcompile.data").joinpath("report.schema.json").read_text(encoding="utf-8")
    assert shipped == schema_text(), "regenerate: python -c 'from qcompile.report_types import schema_text; " \
                                     "print(schema_text(), end=\"\")' > qcompile/data/report.schema.json"


@pytest.mark.parametrize("args", [["--quant", "Q4_K_M", "--package", "all"],
                                  ["--to", "onnx", "--bits", "4"],
                                  ["--quant", "Q4_K_M", "--no-verify"]])
def test_a_compiles_report_satisfies_the_schema_and_reads_back(tiny_models, tmp_path, args):
    assert run_cli(tiny_models["qwen2.5"], *args, "--out", tmp_path, "-q") == 0
    data = json.loads((tmp_path / "report.json").read_text())
    schema = json_schema()
    assert violations(data, schema, schema) == []
    rep = Report.from_dict(data)
    assert rep.to_dict() == data  # nothing lost or invented on the way through the types
    assert rep.schema_version == SCHEMA_VERSION and rep.tensors and rep.artifact.bytes > 0


def test_the_schema_check_can_fail():
    schema = json_schema()
    good = Report().to_dict()
    assert violations(good, schema, schema) == []
    bad = dict(good, tensors=[{"name": 1}], surprise=True)
    bad.pop("artifact")
    found = violations(bad, schema, schema)
    assert any("missing artifact" in v for v in found) and any("surprise" in v for v in found) \
        and any("tensors[0].name" in v for v in found), found


def test_a_version_1_report_reads_with_absent_keys_as_none():
    v1 = Report().to_dict()
    v1["schema_version"] = 1
    v1["tensors"] = [{"name": "blk.0.attn_q.weight", "type": "Q4_K", "shape": [256, 256], "bytes": 36864}]
    del v1["metrics"]
    rep = Report.from_dict(v1)
    assert rep.tensors[0].rel_error is None and rep.metrics is None and rep.tensors[0].bytes == 36864
