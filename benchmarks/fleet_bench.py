#!/usr/bin/env python3
"""A release matrix on this machine: four compiles one after the other vs `qcompile build` (Ray), real 0.5B.

The matrix: the real 0.5B (``../shared/tools/real_qwen.py``'s Qwen2.5-Coder-0.5B-Instruct, dequantized from a
Q4_K_M release with function-preserving rescaling: real shapes and activations, not a Qwen release's weights) x
{GGUF Q4_K_M gptq, GGUF Q8_0, ONNX INT4_G128 gptq, OpenVINO INT4_G128 gptq}, GPTQ on ``--samples`` x ``--seqlen``
windows of ``--calib`` (default python-docs.txt, 128 x 512), ``--no-verify`` (the timing is the compiles').
Rows, each timed by wall clock with the commit it ran:

* ``sequential``: the four ``qcompile`` commands one after the other, each alone on the machine (``--threads``
  = every core), each calibrating for itself: what a release script does without ``build``;
* ``build --no-ray`` (``--no-ray-row``): ``qcompile build`` running the entries here one by one (1 thread each), sharing the
  calibration (tokens once; ONNX and OpenVINO one GPTQ run);
* ``build (Ray, N workers)``: the same matrix on an embedded Ray with ``--workers`` CPUs, 1 thread per entry.

and the calibration time the shared run saved: the GPTQ stage time of the entry that read the shared layers
(report.json ``timings_s``) against the one that computed them.

    python benchmarks/fleet_bench.py [--samples 128] [--seqlen 512] [--workers 2] [--no-ray-row] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tools import SHARED, commit, machine, measure, table  # noqa: E402
from kld_bench import REAL, real_model  # noqa: E402

ENTRIES = [("gguf", "Q4_K_M", "gptq"), ("gguf", "Q8_0", "rtn"), ("onnx", "INT4_G128", "gptq"),
           ("openvino", "INT4_G128", "gptq")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REAL)
    ap.add_argument("--calib", type=Path, default=SHARED / "corpora" / "python-docs.txt")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--no-ray-row", action="store_true", help="also time `build --no-ray` (sharing without Ray)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile-bench" / "fleet")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model = real_model(args.model)
    calib = ["--calib", str(args.calib), "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen)]
    rev = commit()
    rows = []

    # one after the other, each alone with every core
    total = 0.0
    for to, quant, method in ENTRIES:
        out = args.work / "seq" / f"{to}-{quant}-{method}"
        r = measure([sys.executable, "-m", "qcompile", model, "--to", to, "--quant", quant, "--method", method,
                     *(calib if method == "gptq" else []), "--threads", str(os.cpu_count()), "--no-verify", "-q",
                     "--out", out])
        total += r.seconds
        rows.append([f"qcompile {to} {quant} {method} (alone, {os.cpu_count()} threads)", f"{r.seconds:.0f}", "", rev])
        print(f"{to} {quant}: {r.seconds:.0f} s", file=sys.stderr)
    rows.append(["sequential: the four above", f"{total:.0f}", "1.00", rev])

    matrix = args.work / "fleet.toml"
    matrix.write_text(
        f'[options]\ncalib = "{args.calib}"\ncalib-samples = {args.samples}\ncalib-seqlen = {args.seqlen}\n'
        f'verify = false\n[[model]]\npath = "{model}"\nname = "real-0.5b"\n'
        + "".join(f'[[build]]\nto = "{to}"\nquant = "{quant}"\nmethod = "{method}"\n' for to, quant, method in ENTRIES))
    builds = [(f"build, Ray {args.workers} workers (1 thread per entry)", ["--workers", str(args.workers)])]
    if args.no_ray_row:
        builds.insert(0, ("build --no-ray (1 thread per entry)", ["--no-ray"]))
    for label, extra in builds:
        out = args.work / ("no-ray" if "--no-ray" in extra else "ray")
        r = measure([sys.executable, "-m", "qcompile", "build", matrix, "--out", out, "-q", *extra])
        rows.append([label, f"{r.seconds:.0f}", f"{r.seconds / total:.2f}", rev])
        print(f"{label}: {r.seconds:.0f} s", file=sys.stderr)
        saved = shared_saving(out)
    print(f"# Release matrix: real 0.5B x {len(ENTRIES)} entries, GPTQ {args.samples} x {args.seqlen} "
          f"({args.calib.name}), --no-verify; {machine()}\n")
    print(table(["run", "wall (s)", "vs sequential", "commit"], rows))
    print(f"\nShared calibration (the Ray build): {saved}")


def shared_saving(out: Path) -> str:
    """The GPTQ stage of the entry that calibrated vs the one that read its layers."""
    rep = {p.parent.name: json.loads(p.read_text()) for p in out.glob("real-0.5b/*/report.json")}
    onnx, ov = rep["onnx-INT4_G128-gptq"], rep["openvino-INT4_G128-gptq"]
    first, second = sorted((onnx, ov), key=lambda r: r["timings_s"]["quantize"], reverse=True)
    return (f"{first['target']['format']} calibrated ({first['timings_s']['quantize']:.0f} s quantize stage), "
            f"{second['target']['format']} read its layers ({second['timings_s']['quantize']:.1f} s): "
            f"{first['timings_s']['quantize'] - second['timings_s']['quantize']:.0f} s saved; "
            f"{second['calibration']}")


if __name__ == "__main__":
    main()
