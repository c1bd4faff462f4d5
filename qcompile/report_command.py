"""``qcompile report RUN... --out DIR``: compare compile runs in ``report.md`` and a self-contained ``report.html``.

Each RUN is a compile's output directory (its ``report.json`` is read) or a path to a ``report.json``.
``report.md`` holds one table row per run; ``report.html`` holds the same table and two plots embedded as
PNG data URIs (no external resources, so the page works as a CI artifact opened offline): quality vs size
(mean KLD vs file size, one colour and marker per method) and the weight-reconstruction error per decoder
layer (one line per run). Output depends only on the reports: same reports, same bytes.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompile.errors import EXIT_OK, QCompileError, UsageError, guarded
from qcompile.report import SCHEMA_VERSION, atomic_write_text, read_report
from qcompile.report_types import ModelInfo, ReferenceMetrics, Report, TargetInfo

MISSING = "-"
LEGEND = ("ppl: perplexity of the quantized model on the evaluation text; ΔPPL: vs the full-precision model's on "
          "the same text; mean KLD and top-1: the quantized model's next-token distribution vs the full-precision "
          "model's (PyTorch reference path); time: the whole compile.")
CAPTIONS = (  # (alt text, caption) of the two plots
    ("quality vs size", ("Mean KL divergence of the quantized model's next-token distribution from the "
                         "full-precision model's, against the artifact's size on disk.")),
    ("per-layer quantization error", ("Relative weight-reconstruction error ||W - Wq||_F / ||W||_F, averaged over "
                                      "each decoder layer's matrices (report.json tensors[].rel_error). It "
                                      "measures the weights, not the outputs: GPTQ accepts a larger weight error "
                                      "for a smaller output error.")),
)
COLUMNS = ["run", "target", "type", "method", "size (MiB)", "bits/weight", "ppl", "ΔPPL", "mean KLD", "top-1",
           "time (s)"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcompile report", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare compile runs: write DIR/report.md (one table row per run) and DIR/report.html "
                    "(the table, quality vs size and per-layer quantization error plots, self-contained).",
        epilog="examples:\n"
               "  qcompile report out/q4_0 out/q4_k_m out/q8_0 --out report/\n"
               "  qcompile report dist/ --out dist/report/    # every entry of a `qcompile build` folder\n"
               "  qcompile report runs/*/report.json --out report/\n\n"
               "The plots need matplotlib (pip install 'qcompile[report]'); without it report.html has the "
               "table only.\n"
               "exit status: 0 written, 1 error (missing run or report.json, unreadable report), 2 usage error "
               "(including a report.json schema_version newer than this qcompile reads).")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                   help="a compile's --out directory (holding report.json), a report.json file, or a `qcompile "
                        "build` --out directory (its entries)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for report.md and report.html")
    return p


@dataclass
class Run:
    """One compile run: a label for tables and plots, where its report came from, and the report (typed;
    what a report lacks reads as None)."""
    label: str
    path: Path
    rep: Report

    @property
    def reference(self) -> ReferenceMetrics:
        """The reference-path metrics (all None for a --no-verify run)."""
        m = self.rep.metrics
        return (m.reference if m is not None else None) or _NO_METRICS

    @property
    def target(self) -> TargetInfo:
        return self.rep.target or TargetInfo(None, None, None)

    @property
    def size_mib(self) -> float | None:
        size = self.rep.artifact.bytes
        return size / 2**20 if _is_num(size) else None

    @property
    def has_tensor_errors(self) -> bool:
        return any(_is_num(t.rel_error) for t in self.rep.tensors or [])


_NO_METRICS = ReferenceMetrics(*(None,) * 8)


def load_run(arg: Path) -> Run:
    """Read one RUN argument: a directory holding report.json, or a report.json path."""
    if not arg.exists():
        raise QCompileError(f"{arg}: no such run directory or report.json")
    path = arg / "report.json" if arg.is_dir() else arg
    if not path.is_file():
        raise QCompileError(f"{arg}: no report.json in this directory (was the compile finished?)")
    rep = read_report(path)
    if not 1 <= rep["schema_version"] <= SCHEMA_VERSION:
        # a newer qcompile wrote it: guessing at fields this version does not know would misreport
        raise UsageError(f"{path}: schema_version {rep['schema_version']} is not supported (this qcompile reads "
                         f"1..{SCHEMA_VERSION}; upgrade qcompile)")
    # the sections the table and plots read must have their documented shapes (docs/report-schema.md)
    shapes = {"target": dict, "model": dict, "metrics": dict, "timings_s": dict, "tensors": list}
    bad = [k for k, t in shapes.items() if rep.get(k) is not None and not isinstance(rep[k], t)]
    if bad or not all(isinstance(t, dict) for t in rep.get("tensors") or []):
        raise QCompileError(f"{path}: malformed report.json ({', '.join(bad) or 'tensors'})")
    label = (arg if arg.is_dir() else path.parent).resolve().name or str(arg)
    return Run(label, path, Report.from_dict(rep))


def load_runs(args: list[Path]) -> list[Run]:
    """Every run, labelled by its directory name (the path as given where two names collide). A ``qcompile
    build`` folder stands for its entries, labelled by their ids (``model/to-type-method``); an entry that
    failed has no report and is named on stderr."""
    from qcompile.fleet import matrix_entries
    runs: list[Run] = []
    given: list[Path] = []
    for a in args:
        ids = matrix_entries(a) if a.is_dir() and not (a / "report.json").is_file() else None
        if ids is None:
            runs.append(load_run(a))
            given.append(a)
            continue
        missing = [i for i in ids if not (a / i / "report.json").is_file()]
        if missing:
            print(f"qcompile report: note: {a}: no report for {', '.join(missing)} (failed or not built)",
                  file=sys.stderr)
        for i in ids:
            if i not in missing:
                runs.append(load_run(a / i))
                runs[-1].label = i if len(args) == 1 else f"{a.name}/{i}"
                given.append(a / i)
    if not runs:
        raise QCompileError(f"{', '.join(map(str, args))}: no finished runs to report")
    names = [r.label for r in runs]
    for r, a in zip(runs, given):
        if names.count(r.label) > 1:
            r.label = str(a)
    return runs


# ---- the table ----------------------------------------------------------------------------------

def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value: Any, fmt: str, scale: float = 1.0) -> str:
    return format(value * scale, fmt) if _is_num(value) else MISSING


def row(run: Run) -> list[str]:
    """The run's table cells, in :data:`COLUMNS` order; a metric the report lacks is ``-``."""
    target, art, ref = run.target, run.rep.artifact, run.reference
    ppl, ppl_fp = ref.ppl_quant, ref.ppl_fp
    delta = MISSING
    if _is_num(ppl) and _is_num(ppl_fp) and ppl_fp:
        delta = f"{ppl - ppl_fp:+.3f} ({100 * (ppl - ppl_fp) / ppl_fp:+.2f}%)"
    top1 = _num(ref.top1, ".2f", 100)
    return [run.label, target.format or MISSING, target.scheme or MISSING, target.method or MISSING,
            _num(run.size_mib, ".2f"), _num(art.bits_per_weight, ".2f"), _num(ppl, ".3f"),
            delta, _num(ref.kld_mean, ".6f"), top1 if top1 == MISSING else f"{top1}%",
            _num((run.rep.timings_s or {}).get("total"), ".1f")]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(runs: list[Run]) -> str:
    """report.md: the comparison table and the evaluation each run was scored on."""
    lines = ["# qcompile report", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row(r)) + " |" for r in runs]
    lines += ["", LEGEND, ""]
    lines += [f"- {_md_cell(r.label)}: {_describe(r)}" for r in runs]
    return "\n".join(lines) + "\n"


def _describe(run: Run) -> str:
    """One line on what a run compiled and how it was evaluated (everything taken from its report)."""
    m, ref = run.rep.model or ModelInfo(*(None,) * 9), run.reference
    q = lambda v: "?" if v is None else v
    parts = [f"{q(m.name)} ({q(m.architecture)}, {q(m.parameters)} parameters)"]
    parts.append(f"evaluated on {q(ref.tokens)} tokens, ctx {q(ref.ctx)}, full-precision ppl "
                 f"{_num(ref.ppl_fp, '.3f')}" if ref is not _NO_METRICS else "not verified (no quality metrics)")
    if run.rep.calibration:
        parts.append(f"calibration: {run.rep.calibration}")
    parts.append(f"schema_version {run.rep.schema_version}")
    return "; ".join(parts)


# ---- the plots ----------------------------------------------------------------------------------

_LAYER = re.compile(r"(?:^|\.)(?:blk|layers)\.(\d+)\.")
MARKERS = "osD^v<>ph*"


def layer_errors(run: Run) -> dict[int, float]:
    """Mean relative weight-reconstruction error of each decoder layer's matrices (vectors such as norms and
    biases, stored exactly or nearly so, would only dilute it); empty without per-tensor data."""
    per_layer: dict[int, list[float]] = {}
    for t in run.rep.tensors or []:
        m = _LAYER.search(str(t.name or ""))
        shape = t.shape
        if m and _is_num(t.rel_error) and isinstance(shape, list) and len(shape) == 2 and min(shape) > 1:
            per_layer.setdefault(int(m.group(1)), []).append(float(t.rel_error))
    return {i: sum(v) / len(v) for i, v in sorted(per_layer.items())}


def _png(draw: Callable[[Any], None]) -> bytes:
    """Render one figure to PNG bytes under matplotlib's default style (a user's matplotlibrc must not change
    the page) and without the Software/date metadata, so the bytes depend only on the data."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        fig = Figure(figsize=(8, 4.8), dpi=100)
        FigureCanvasAgg(fig)  # Agg, without pyplot: no GUI backend, no global figure state
        draw(fig)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _log_if_wide(ax, values: list[float]) -> None:
    """Log y axis when the values span more than 20x (8-bit and 4-bit runs differ by orders of magnitude)."""
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def quality_plot(runs: list[Run], what: str = "") -> bytes:
    """Mean KLD vs artifact size, one colour/marker per method, each point labelled with its run."""
    def draw(fig) -> None:
        ax = fig.add_subplot()
        ax.set_title(f"Quality vs size{what} (lower left is better)")
        pts = [r for r in runs if _is_num(r.reference.kld_mean) and r.size_mib is not None]
        if not pts:
            _note(ax, "no quality metrics in these reports (compiled with --no-verify)")
            return
        methods = sorted({r.target.method or "?" for r in pts})
        for i, method in enumerate(methods):
            mine = [r for r in pts if (r.target.method or "?") == method]
            ax.scatter([r.size_mib for r in mine], [r.reference.kld_mean for r in mine],
                       color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)], s=60, label=method, zorder=3)
        for r in pts:
            ax.annotate(f"{r.label} ({r.target.scheme or '?'})",
                        (r.size_mib, r.reference.kld_mean),
                        textcoords="offset points", xytext=(6, 6), fontsize=8)
        _log_if_wide(ax, [r.reference.kld_mean for r in pts])
        ax.margins(0.15)  # room for the point labels
        ax.set_xlabel("artifact size (MiB)")
        ax.set_ylabel("mean KLD vs full precision")
        ax.grid(True, alpha=0.3)
        ax.legend(title="method")
        skipped = [r.label for r in runs if r not in pts]
        if skipped:
            ax.set_title(f"Quality vs size{what} (lower left is better)\nnot verified, not shown: {', '.join(skipped)}")
    return _png(draw)


def layer_plot(runs: list[Run], what: str = "") -> bytes:
    """Per-layer weight-reconstruction error, one line per run; runs without per-tensor data are named."""
    from matplotlib.ticker import MaxNLocator

    def draw(fig) -> None:
        ax = fig.add_subplot()
        ax.set_title(f"Quantization error per decoder layer{what}")
        series = [(r, layer_errors(r)) for r in runs]
        drawn = [(r, e) for r, e in series if e]
        missing = [r.label for r, e in series if not e]
        if not drawn:
            _note(ax, "no per-tensor error data in these reports\n(schema_version 1 reports predate it)")
            return
        for i, (r, errs) in enumerate(drawn):
            ax.plot(list(errs), list(errs.values()), marker=MARKERS[i % len(MARKERS)], color=f"C{i % 10}",
                    label=f"{r.label} ({r.target.scheme or '?'})")
        _log_if_wide(ax, [v for _, e in drawn for v in e.values()])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("mean ||W - Wq|| / ||W|| of the layer's matrices")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if missing:
            ax.set_title(f"Quantization error per decoder layer{what}\nno per-tensor data (schema_version 1): "
                         f"{', '.join(missing)}")
    return _png(draw)


# ---- the page -----------------------------------------------------------------------------------

_CSS = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
th,td{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eee}
td:first-child,th:first-child{text-align:left}
figure{margin:2em 0}figcaption{color:#555;max-width:800px}"""


def page(runs: list[Run], plots: list[tuple[str, bytes, str]]) -> str:
    """report.html: the table, notes and the plots as PNG data URIs (self-contained)."""
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in COLUMNS)
    body = "\n".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row(r)) + "</tr>" for r in runs)
    notes = "\n".join(f"<li>{esc(r.label)}: {esc(_describe(r))}"
                      + ("" if r.has_tensor_errors else " (no per-tensor error data)") + "</li>" for r in runs)
    figs = "\n".join(f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                     f"<figcaption>{esc(caption)}</figcaption></figure>" for alt, png, caption in plots) \
        or f"<p>{esc(NO_PLOTS)}</p>"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>qcompile report</title>'
            f"<style>{_CSS}</style></head><body>\n<h1>qcompile report</h1>\n"
            f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>\n<ul>\n{notes}\n</ul>\n"
            f"{figs}\n</body></html>\n")


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


NO_PLOTS = "plots omitted: matplotlib is not installed (pip install 'qcompile[report]')"


def write(runs: list[Run], out: Path) -> tuple[Path, Path]:
    """Render both files into ``out`` (each written to a temp name and renamed). Without matplotlib (an
    extra: compiling never needs it) report.md is complete and report.html has the table and notes, and
    says where the plots went."""
    if out.exists() and not out.is_dir():
        raise QCompileError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if have_matplotlib():
        # one pair of plots per format when the runs span several (a build matrix): sizes and errors of a GGUF mix
        # and of an ONNX grid do not share an axis a reader can compare on
        formats = sorted({r.target.format or "?" for r in runs})
        for fmt in formats:
            mine = [r for r in runs if (r.target.format or "?") == fmt] if len(formats) > 1 else runs
            what = f": {fmt}" if len(formats) > 1 else ""
            plots += [(alt + what.replace(":", ","), png, caption) for (alt, caption), png in
                      zip(CAPTIONS, (quality_plot(mine, what), layer_plot(mine, what)))]
    md, page_path = out / "report.md", out / "report.html"
    atomic_write_text(md, markdown(runs))
    atomic_write_text(page_path, page(runs, plots))
    return md, page_path


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    code, written = guarded("qcompile report", lambda: write(load_runs(args.runs), args.out))
    if code != EXIT_OK:
        return code
    for path in written:
        print(f"wrote {path}")
    if not have_matplotlib():
        print(f"qcompile report: note: {NO_PLOTS}", file=sys.stderr)
    return EXIT_OK
