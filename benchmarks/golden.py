"""Byte-identity check for refactors: a fixed set of compiles on the tiny models, their artifacts' sha256 and
the report.json fields that hold no times or versions.

    PYTHONPATH=. python benchmarks/golden.py record golden.json     # in a checkout of the old code
    PYTHONPATH=. python benchmarks/golden.py compare golden.json    # in the new one: exit 1 and the differences

(``PYTHONPATH=.``: the checkout's own code, not the one an editable install points to.)

The runs cover every target and method family: RTN Q4_K_M / Q8_0 / Q4_0 GGUF, GPTQ Q4_K_M with a fixed
``--calib`` file, ``--target-bpw`` and ``--max-size`` mixes, the default ``--bits 4`` (self-calibrated), ONNX and OpenVINO int4
with RTN and GPTQ, and ``--package all``. The models are the test suite's tiny checkpoints (seeded, built on the
spot), so the hashes depend only on the code, the library versions and the machine (the calibration's compute
dtype follows the CPU: ``quantizers.linalg.compute_dtype``): record and compare on one machine and venv.
Runs go to one fixed folder (``$TMPDIR/qcompile-golden``, emptied first), since the packages hold absolute paths.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from qcompile import tiny
from qcompile.cli import main as qcompile

# name -> (tiny model of qcompile.tiny.VARIANTS, arguments after MODEL)
CALIB = ["--calib", "{calib}", "--calib-samples", "8", "--calib-seqlen", "64"]
RUNS: dict[str, tuple[str, list[str]]] = {
    "gguf-rtn-q4_k_m": ("qwen2.5", ["--quant", "Q4_K_M"]),
    "gguf-rtn-q4_k_m-qwen3": ("qwen3", ["--quant", "Q4_K_M"]),
    "gguf-rtn-q8_0": ("qwen2", ["--quant", "Q8_0"]),
    "gguf-rtn-q4_0": ("qwen2.5", ["--quant", "Q4_0"]),
    "gguf-gptq-q4_k_m": ("qwen2", ["--quant", "Q4_K_M", "--method", "gptq", *CALIB]),
    "gguf-awq-q4_k_m": ("qwen3", ["--quant", "Q4_K_M", "--method", "awq", *CALIB]),
    "gguf-awq+gptq-q4_k_m": ("qwen2", ["--quant", "Q4_K_M", "--method", "awq+gptq", *CALIB]),
    "gguf-target-bpw": ("qwen2", ["--quant", "Q4_K_M", "--target-bpw", "4.6", *CALIB]),
    "gguf-max-size": ("qwen3", ["--quant", "Q4_K_M", "--max-size", "2.6MiB", "--method", "rtn", *CALIB]),
    "gguf-bits4-default": ("qwen2.5", ["--bits", "4", "--calib-samples", "4", "--calib-seqlen", "32"]),
    "onnx-rtn-int4": ("qwen2.5", ["--to", "onnx", "--bits", "4"]),
    "onnx-gptq-int4": ("qwen3", ["--to", "onnx", "--bits", "4", "--method", "gptq", *CALIB]),
    "openvino-rtn-int4": ("qwen2", ["--to", "openvino", "--bits", "4"]),
    "openvino-gptq-int4": ("qwen2.5", ["--to", "openvino", "--bits", "4", "--method", "gptq", *CALIB]),
    "gguf-package-all": ("qwen2.5", ["--quant", "Q4_K_M", "--package", "all"]),
}
VOLATILE = {"timings_s", "versions", "command", "full_path"}  # report keys that hold times, versions or argv


def _volatile_file(f: dict) -> bool:
    """A report's file entry whose hash cannot repeat: report.json itself (timings), OpenVINO's XML (node names)."""
    return isinstance(f, dict) and str(f.get("path", "")).endswith(("report.json", ".xml"))


def build_models(root: Path) -> dict[str, Path]:
    return {name: tiny.build_variant(name, root / "models" / name) for name in tiny.VARIANTS}


AUTO_NAME = re.compile(rb'( name="[A-Za-z]+)_\d+"')


def _normalised(rel: Path, data: bytes, work: Path) -> bytes:
    """The bytes compared: as written, except what no run repeats. OpenVINO numbers the nodes it names itself
    with a process-wide counter (``Convert_40324``), which varies between identical runs; a package's
    manifest.json lists report.json's hash, and report.json holds the timings."""
    data = data.replace(str(work).encode(), b"<work>")
    if rel.suffix == ".xml":
        data = AUTO_NAME.sub(rb'\1_N"', data)
    if rel.name == "manifest.json":
        doc = json.loads(data)
        doc["files"] = [f for f in doc.get("files", []) if f.get("path") != "report.json"]
        data = json.dumps(doc, sort_keys=True).encode()
    return data


def _fields(obj, work: Path):
    """report.json without the volatile keys, paths made relative to the work folder."""
    if isinstance(obj, dict):
        return {k: _fields(v, work) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [{k: v for k, v in _fields(x, work).items() if k != "sha256"} if _volatile_file(x) else _fields(x, work)
                for x in obj]
    if isinstance(obj, str):
        return obj.replace(str(work), "<work>")
    return obj


def run_all(only: list[str] | None = None, keep: bool = False) -> dict:
    # one fixed folder: the packages (Modelfile, LM Studio README) hold the artifact's absolute path
    work = Path(tempfile.gettempdir()) / "qcompile-golden"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        models = build_models(work)
        calib = work / "calib.txt"
        calib.write_text(tiny.builtin_text(), encoding="utf-8")
        result = {}
        for run, (model, args) in RUNS.items():
            if only and run not in only:
                continue
            out = work / "out" / run
            argv = [str(models[model]), *[a.format(calib=calib) for a in args], "--out", str(out), "--quiet"]
            rc = qcompile(argv)
            files = {}
            for f in sorted(p for p in out.rglob("*") if p.is_file()):
                rel = f.relative_to(out)
                if rel.name == "report.json" or any(part.startswith(".") for part in rel.parts):
                    continue
                files[str(rel)] = hashlib.sha256(_normalised(rel, f.read_bytes(), work)).hexdigest()
            rep = out / "report.json"
            fields = _fields(json.loads(rep.read_text()), work) if rep.is_file() else None
            result[run] = {"rc": rc, "files": files, "report": fields}
            print(f"{run:24s} rc={rc} {len(files)} files", file=sys.stderr)
        return result
    finally:
        if keep:
            print(f"outputs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: {'only before' if k in a else 'only after'}")
            else:
                out += _diff(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {json.dumps(a)[:80]} -> {json.dumps(b)[:80]}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["record", "compare"])
    ap.add_argument("file", type=Path)
    ap.add_argument("--only", nargs="*", help="run only these (names: " + ", ".join(RUNS) + ")")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (models and outputs)")
    a = ap.parse_args(argv)
    got = run_all(a.only, a.keep)
    if a.mode == "record":
        if a.only and a.file.is_file():  # re-record some runs: keep the others
            got = {**json.loads(a.file.read_text()), **got}
        a.file.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(got)} runs, {sum(len(r['files']) for r in got.values())} files -> {a.file}")
        return 0
    want = json.loads(a.file.read_text())
    bad = 0
    for run, now in got.items():
        diffs = _diff(want.get(run), now) if run in want else ["not recorded"]
        bad += bool(diffs)
        n = len(now["files"])
        print(f"{run:24s} {'identical' if not diffs else 'DIFFERS'}  ({n} files, report fields)")
        for d in diffs[:12]:
            print(f"    {d}")
    print(f"{len(got) - bad} of {len(got)} runs byte-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
