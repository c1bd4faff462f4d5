"""``qcompile build MATRIX.toml --out DIR``: a matrix of compiles on Ray (:mod:`qcompile.fleet`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qcompile.errors import EXIT_FAILURE, EXIT_OK, guarded

EPILOG = """\
examples:
  qcompile build fleet.toml --out dist/                   # an embedded local Ray (pip install 'qcompile[fleet]')
  qcompile build fleet.toml --out /shared/dist --ray-address ray://head:10001   # an existing cluster
  RAY_ADDRESS=auto qcompile build fleet.toml --out dist/  # the cluster this machine belongs to
  qcompile report dist/ --out dist/report/                # every entry in one table and plots
  qcompile check dist/ --baseline last-release/           # gate every entry against its counterpart

MATRIX.toml (docs/fleet.md):
  [options]                  # every entry: compile options as on the command line (calib, calib-samples, ...)
  calib = "corpus.txt"
  [[model]]
  path = "./Qwen2.5-0.5B-Instruct"      # MODEL as `qcompile MODEL` takes it
  [[build]]                  # lists multiply
  to = ["gguf"]
  quant = ["Q4_K_M", "Q8_0"]
  [[build]]
  to = ["onnx", "openvino"]
  bits = 4
  method = "gptq"

Each entry compiles into DIR/{model}/{to}-{type}-{method}/ (its report.json and build.json) with 1 thread unless
its options say threads = N. Entries with the same model and calibration share the calibration tokens; with the
same method and weight grid too (ONNX and OpenVINO at INT4_G128), the calibrated layers. An entry finished from
the same inputs is skipped; a failed build keeps DIR/.shared, so a rerun resumes.
exit status: 0 every entry done or skipped, 1 an entry failed (one line each), 2 usage error."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcompile build", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Compile a matrix of models x formats x types x methods, in parallel "
                                            "on Ray when it is installed (else one by one, with the same results).",
                                epilog=EPILOG)
    p.add_argument("matrix", type=Path, metavar="MATRIX.toml", help="the matrix of compiles")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="where the entries go (on a cluster: a folder every node shares)")
    p.add_argument("--ray-address", metavar="ADDR", help="an existing Ray cluster (default: $RAY_ADDRESS, else an "
                                                         "embedded local Ray)")
    p.add_argument("--workers", type=int, metavar="N", help="embedded Ray: CPUs it schedules (default: all)")
    p.add_argument("--no-ray", dest="ray", action="store_false", help="run the entries here, one by one")
    p.add_argument("--force", action="store_true", help="rebuild entries that are finished and up to date")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from qcompile import fleet

    def work():
        return fleet.build(fleet.read_matrix(args.matrix), args.out, ray_address=args.ray_address,
                           workers=args.workers, use_ray=args.ray, force=args.force, quiet=args.quiet)

    code, results = guarded("qcompile build", work, "interrupted; finished entries are in place, none partial")
    if code != EXIT_OK:
        return code
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"qcompile build: error: {r.id}: {r.error}", file=sys.stderr)
    if not args.quiet:
        counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
        print(f"{len(results)} entries: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f" -> {args.out}")
    return EXIT_FAILURE if failed else EXIT_OK
