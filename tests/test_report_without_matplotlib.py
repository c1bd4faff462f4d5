"""``qcompile report`` after the README's plain install (no matplotlib): report.md complete, report.html with
the table and a note where the plots would be, exit 0 (the plots are the ``[report]`` extra)."""
from __future__ import annotations

import subprocess
import sys

from conftest import run_cli

BLOCK = "import sys; sys.modules['matplotlib'] = None; from qcompile.cli import main; sys.exit(main(sys.argv[1:]))"


def test_report_without_matplotlib(tiny_models, tmp_path):
    run = tmp_path / "q4_0"
    assert run_cli(tiny_models["qwen2"], "--quant", "Q4_0", "--method", "rtn", "--out", run, "-q") == 0
    r = subprocess.run([sys.executable, "-c", BLOCK, "report", str(run), "--out", str(tmp_path / "rep")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "plots omitted: matplotlib is not installed" in r.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "| q4_0 |" in md and "Q4_0" in md
    assert "<td>q4_0</td>" in page and "plots omitted" in page and "<img" not in page
