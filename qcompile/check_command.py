"""``qcompile check REPORT.json --baseline BASE.json [budgets]``: a CI quality gate on two report.json files.

Exit 0 when the run is within every budget, 1 with one line per violated budget otherwise (and when the
two runs are not comparable: other model, other evaluation). Budgets are relative to the baseline unless
given as absolute values; the defaults allow no more than a small slack, because a compile is
deterministic: the same inputs give the same numbers, so any drift is a change worth a look.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from qcompile.errors import EXIT_FAILURE, EXIT_OK, QCompileError, guarded
from qcompile.report import read_report
from qcompile.units import parse_size


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
    p.add_argument("report", type=Path, metavar="REPORT", help="report.json of the run to check")
    p.add_argument("--baseline", type=Path, required=True, metavar="BASE", help="report.json to compare with")
    p.add_argument("--max-kld", metavar="X", help="mean KLD ceiling: a number, or +P%% over the baseline "
                                                 "(default +5%%)")
    p.add_argument("--max-ppl-increase", metavar="P%", default="0.5%",
                   help="perplexity increase allowed over the baseline's, in percent (default 0.5%%)")
    p.add_argument("--max-top1-drop", metavar="PTS", type=float, default=0.5,
                   help="top-1 agreement drop allowed, in percentage points (default 0.5)")
    p.add_argument("--max-size", metavar="S", help="artifact size ceiling: bytes with a unit (480MiB, 0.5GB), "
                                                   "or +P%% over the baseline (default +1%%)")
    return p


def _percent(text: str, what: str) -> float:
    m = re.fullmatch(r"\+?\s*([0-9.]+)\s*%?", text.strip())
    if not m:
        raise QCompileError(f"{what} {text!r}: expected a percentage such as 2%")
    return float(m.group(1)) / 100


def _ceiling(text: str | None, base: float, default: float, what: str, size: bool = False) -> float:
    """An absolute ceiling from ``text``: "+P%" relative to ``base``, a number (with a unit for sizes)."""
    if text is None:
        return base * (1 + default)
    if text.strip().startswith("+") or text.strip().endswith("%"):
        return base * (1 + _percent(text, what))
    if size:
        return parse_size(text, what)
    m = re.fullmatch(r"([0-9.]+(?:e-?[0-9]+)?)", text.strip())
    if not m:
        raise QCompileError(f"{what} {text!r}: expected a number or +P%")
    return float(m.group(1))


def _reference(rep: dict, path: Path) -> dict:
    ref = (rep.get("metrics") or {}).get("reference")
    if not ref:
        raise QCompileError(f"{path}: no quality metrics (the run used --no-verify)")
    return ref


def check(run: dict, base: dict, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(passed lines, violation lines) of ``run`` against ``base`` under ``args``' budgets."""
    r, b = _reference(run, args.report), _reference(base, args.baseline)
    if run["model"].get("parameters") != base["model"].get("parameters"):
        raise QCompileError(f"not comparable: {run['model'].get('name')} vs baseline "
                            f"{base['model'].get('name')} (different models)")
    for key in ("tokens", "ctx"):
        if r.get(key) != b.get(key):
            raise QCompileError(f"not comparable: evaluated on {key}={r.get(key)}, baseline {key}={b.get(key)} "
                                "(use the same --eval-text/--eval-ctx/--eval-tokens)")
    ok, bad = [], []

    def gate(name: str, value: float, limit: float, detail: str, higher_is_worse: bool = True) -> None:
        good = value <= limit if higher_is_worse else value >= limit
        line = f"{name} {value:.6g} {'<=' if higher_is_worse else '>='} {limit:.6g} ({detail})"
        (ok if good else bad).append(line if good else f"{name} regressed: {value:.6g} "
                                     f"{'>' if higher_is_worse else '<'} {limit:.6g} ({detail})")
    gate("mean KLD", r["kld_mean"], _ceiling(args.max_kld, b["kld_mean"], 0.05, "--max-kld"),
         f"baseline {b['kld_mean']:.6g}")
    gate("perplexity", r["ppl_quant"], b["ppl_quant"] * (1 + _percent(args.max_ppl_increase, "--max-ppl-increase")),
         f"baseline {b['ppl_quant']:.6g} + {args.max_ppl_increase}")
    gate("top-1 %", 100 * r["top1"], 100 * b["top1"] - args.max_top1_drop,
         f"baseline {100 * b['top1']:.4g} - {args.max_top1_drop} points", higher_is_worse=False)
    gate("size bytes", run["artifact"]["bytes"],
         _ceiling(args.max_size, base["artifact"]["bytes"], 0.01, "--max-size", size=True),
         f"baseline {base['artifact']['bytes']}")
    return ok, bad


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    def work() -> tuple[list[str], list[str]]:
        return check(read_report(args.report), read_report(args.baseline), args)

    code, result = guarded("qcompile check", work)
    if code != EXIT_OK:
        return code
    ok, bad = result
    for line in ok:
        print(f"ok: {line}")
    for line in bad:
        print(f"qcompile check: {line}", file=sys.stderr)
    return EXIT_FAILURE if bad else EXIT_OK
