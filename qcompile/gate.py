"""Quality budgets: one gate for ``qcompile check`` (two report.json files) and for a compile's own
``--max-kld`` / ``--baseline`` (the metrics just measured, before the artifact is renamed into place).

A budget is an absolute ceiling or, given a baseline report, relative to it. With a baseline every budget
applies, at the defaults below unless set; without one only absolute ceilings can (a relative budget
without a baseline is a usage error). The defaults allow only a small slack: a compile is deterministic,
the same inputs give the same numbers, so any drift is a change worth a look.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qcompile.errors import QCompileError, UsageError
from qcompile.report_types import Metrics, ReferenceMetrics, Report
from qcompile.units import parse_size

DEFAULT_KLD = "+5%"
DEFAULT_PPL_INCREASE = "0.5%"
DEFAULT_TOP1_DROP = 0.5
DEFAULT_SIZE = "+1%"


@dataclass
class Budgets:
    """As typed on the command line; None: the default (with a baseline) or no budget (without)."""
    max_kld: str | None = None            # a number, or +P% over the baseline
    max_ppl_increase: str | None = None   # P% over the baseline's perplexity
    max_top1_drop: float | None = None    # percentage points below the baseline's top-1
    max_size: str | None = None           # bytes with a unit, or +P% over the baseline

    def any(self) -> bool:
        return any(v is not None for v in (self.max_kld, self.max_ppl_increase, self.max_top1_drop, self.max_size))


def _percent(text: str, what: str) -> float:
    m = re.fullmatch(r"\+?\s*([0-9.]+)\s*%?", text.strip())
    if not m:
        raise QCompileError(f"{what} {text!r}: expected a percentage such as 2%")
    return float(m.group(1)) / 100


def _relative(text: str) -> bool:
    return text.strip().startswith("+") or text.strip().endswith("%")


def _ceiling(text: str, base: float | None, what: str, size: bool = False) -> float:
    """An absolute ceiling from ``text``: "+P%" relative to ``base``, or a number (with a unit for sizes)."""
    if _relative(text):
        if base is None:
            raise UsageError(f"{what} {text}: a relative budget needs --baseline")
        return base * (1 + _percent(text, what))
    if size:
        return parse_size(text, what)
    m = re.fullmatch(r"([0-9.]+(?:e-?[0-9]+)?)", text.strip())
    if not m:
        raise QCompileError(f"{what} {text!r}: expected a number or +P%")
    return float(m.group(1))


def validate(budgets: Budgets, baseline: Report | None) -> None:
    """Fail now (before any work) on budgets that cannot be applied."""
    if baseline is None:
        for flag, v in (("--max-ppl-increase", budgets.max_ppl_increase), ("--max-top1-drop", budgets.max_top1_drop)):
            if v is not None:
                raise UsageError(f"{flag} is relative to a baseline: give --baseline REPORT.json")
        if budgets.max_kld is not None:
            _ceiling(budgets.max_kld, None, "--max-kld")
        if budgets.max_size is not None:
            _ceiling(budgets.max_size, None, "--max-size", size=True)
    else:
        reference(baseline, Path("--baseline"))


def reference(rep: Report, path: Path) -> ReferenceMetrics:
    """A report's reference-path metrics; a one-line error when it has none."""
    ref = rep.metrics.reference if isinstance(rep.metrics, Metrics) else None
    if ref is None:
        raise QCompileError(f"{path}: no quality metrics (the run used --no-verify)")
    return ref


def comparable(ref: ReferenceMetrics, params: int | None, base: Report) -> None:
    """Raise unless the run and the baseline measured the same model on the same evaluation."""
    b = reference(base, Path("baseline"))
    if params != base.model.parameters:
        raise QCompileError(f"not comparable: {params} parameters vs the baseline's "
                            f"{base.model.parameters} ({base.model.name}: different models)")
    for key in ("tokens", "ctx"):
        if getattr(ref, key) != getattr(b, key):
            raise QCompileError(f"not comparable: evaluated on {key}={getattr(ref, key)}, baseline "
                                f"{key}={getattr(b, key)} (use the same --eval-text/--eval-ctx/--eval-tokens)")


def judge(ref: ReferenceMetrics, size: int, params: int | None, base: Report | None, budgets: Budgets
          ) -> tuple[list[str], list[str]]:
    """(passed lines, violation lines) of a run's reference metrics ``ref`` and artifact ``size`` in bytes.

    With ``base`` (a baseline report.json) every budget applies, defaults filled in; without, only the
    absolute ones given."""
    ok, bad = [], []

    def gate(name: str, value: float, limit: float, detail: str, higher_is_worse: bool = True) -> None:
        good = value <= limit if higher_is_worse else value >= limit
        if good:
            ok.append(f"{name} {value:.6g} {'<=' if higher_is_worse else '>='} {limit:.6g} ({detail})")
        else:
            bad.append(f"{name} regressed: {value:.6g} {'>' if higher_is_worse else '<'} {limit:.6g} ({detail})")

    if base is None:
        if budgets.max_kld is not None:
            gate("mean KLD", ref.kld_mean, _ceiling(budgets.max_kld, None, "--max-kld"), "--max-kld")
        if budgets.max_size is not None:
            gate("size bytes", size, _ceiling(budgets.max_size, None, "--max-size", size=True), "--max-size")
        return ok, bad
    comparable(ref, params, base)
    b = reference(base, Path("baseline"))
    ppl = budgets.max_ppl_increase or DEFAULT_PPL_INCREASE
    drop = DEFAULT_TOP1_DROP if budgets.max_top1_drop is None else budgets.max_top1_drop
    gate("mean KLD", ref.kld_mean, _ceiling(budgets.max_kld or DEFAULT_KLD, b.kld_mean, "--max-kld"),
         f"baseline {b.kld_mean:.6g}")
    gate("perplexity", ref.ppl_quant, b.ppl_quant * (1 + _percent(ppl, "--max-ppl-increase")),
         f"baseline {b.ppl_quant:.6g} + {ppl}")
    gate("top-1 %", 100 * ref.top1, 100 * b.top1 - drop, f"baseline {100 * b.top1:.4g} - {drop} points",
         higher_is_worse=False)
    gate("size bytes", size, _ceiling(budgets.max_size or DEFAULT_SIZE, base.artifact.bytes, "--max-size",
                                      size=True), f"baseline {base.artifact.bytes}")
    return ok, bad
