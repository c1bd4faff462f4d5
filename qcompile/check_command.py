"""``qcompile check REPORT.json --baseline BASE.json [budgets]``: a CI quality gate on two report.json files.

Exit 0 when the run is within every budget, 1 with one line per violated budget otherwise (and when the
two runs are not comparable: other model, other evaluation). Budgets are relative to the baseline unless
given as absolute values; the defaults allow no more than a small slack, because a compile is
deterministic: the same inputs give the same numbers, so any drift is a change worth a look.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qcompile import gate
from qcompile.errors import EXIT_FAILURE, EXIT_OK, QCompileError, guarded
from qcompile.report import load_report
from qcompile.report_types import Report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcompile check", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare a run's report.json with a baseline report.json; fail on quality or size "
                    "regressions.",
        epilog="examples:\n"
               "  qcompile check out/report.json --baseline baseline/report.json\n"
               "  qcompile check out/report.json --baseline base.json --max-kld 0.03 --max-ppl-increase 2% "
               "--max-size 480MiB\n\n"
               "defaults: mean KLD <= baseline x 1.05, perplexity <= baseline + 0.5%, top-1 >= baseline - 0.5 "
               "points, size <= baseline + 1%.\nexit status: 0 within budget, 1 regression (one line per "
               "violated budget) or error, 2 usage error.")
    p.add_argument("report", type=Path, metavar="REPORT", help="report.json of the run to check, or a `qcompile "
                                                                 "build` folder (every entry)")
    p.add_argument("--baseline", type=Path, required=True, metavar="BASE",
                   help="report.json to compare with (for a build folder: the baseline build folder)")
    p.add_argument("--max-kld", metavar="X", help="mean KLD ceiling: a number, or +P%% over the baseline "
                                                 "(default +5%%)")
    p.add_argument("--max-ppl-increase", metavar="P%",
                   help="perplexity increase allowed over the baseline's, in percent (default 0.5%%)")
    p.add_argument("--max-top1-drop", metavar="PTS", type=float,
                   help="top-1 agreement drop allowed, in percentage points (default 0.5)")
    p.add_argument("--max-size", metavar="S", help="artifact size ceiling: bytes with a unit (480MiB, 0.5GB), "
                                                   "or +P%% over the baseline (default +1%%)")
    return p


def check(run: Report, base: Report, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(passed lines, violation lines) of ``run`` against ``base`` under ``args``' budgets."""
    budgets = gate.Budgets(args.max_kld, args.max_ppl_increase, args.max_top1_drop, args.max_size)
    gate.reference(base, args.baseline)  # (named by its path when it has no metrics)
    return gate.judge(gate.reference(run, args.report), run.artifact.bytes, run.model.parameters, base, budgets)


def check_matrix(out: Path, ids: list[str], args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """A ``qcompile build`` folder against another (``--baseline BASE_DIR``): every entry against the entry of the
    same id; an entry without a report (failed) or without a counterpart is a violation, never a silent pass."""
    base = args.baseline
    if not base.is_dir():
        raise QCompileError(f"--baseline {base}: a build folder is checked against a build folder")
    passed, bad = [], []
    for i in ids:
        run, ref = out / i / "report.json", base / i / "report.json"
        if not run.is_file():
            bad.append(f"{i}: no report.json (the entry failed or was not built)")
            continue
        if not ref.is_file():
            bad.append(f"{i}: no counterpart in {base}")
            continue
        one = argparse.Namespace(**{**vars(args), "report": run, "baseline": ref})
        ok, worse = check(load_report(run), load_report(ref), one)
        passed += [f"{i}: {line}" for line in ok]
        bad += [f"{i}: {line}" for line in worse]
    return passed, bad


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    def work() -> tuple[list[str], list[str]]:
        from qcompile.fleet import matrix_entries
        ids = matrix_entries(args.report) if args.report.is_dir() else None
        if ids is None:
            return check(load_report(args.report), load_report(args.baseline), args)
        return check_matrix(args.report, ids, args)

    code, result = guarded("qcompile check", work)
    if code != EXIT_OK:
        return code
    ok, bad = result
    for line in ok:
        print(f"ok: {line}")
    for line in bad:
        print(f"qcompile check: {line}", file=sys.stderr)
    return EXIT_FAILURE if bad else EXIT_OK
