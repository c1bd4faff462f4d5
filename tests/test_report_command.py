"""``qcompile report``: per-tensor errors in report.json, the comparison table, the self-contained page (rendered
in headless Chromium), errors, and the example GitHub Actions workflow's command lines."""
from __future__ import annotations

import base64
import importlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

pytest.importorskip("matplotlib", reason="qcompile report's plots need matplotlib (pip install -e '.[report]')")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "examples" / "github-actions-qcompile.yml"
PNG_URI = re.compile(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
# matplotlib's default colour cycle: C0 (blue), C1 (orange), C2 (green)
CYCLE = [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)]


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory) -> list[Path]:
    """Three compiles of the tiny Qwen2 model: RTN Q4_0, GPTQ Q4_K_M (small file calibration), RTN Q8_0."""
    from qcompile.tiny import builtin_text
    root = tmp_path_factory.mktemp("report-runs")
    calib = root / "calib.txt"
    calib.write_text(builtin_text() * 6)
    model = tiny_models["qwen2"]
    common = ["--eval-ctx", "64", "--eval-tokens", "256", "-q"]
    args = {"rtn-q4_0": ["--quant", "Q4_0", "--method", "rtn"],
            "gptq-q4_k_m": ["--quant", "Q4_K_M", "--method", "gptq", "--calib", calib, "--calib-samples", "4",
                            "--calib-seqlen", "32"],
            "rtn-q8_0": ["--quant", "Q8_0", "--method", "rtn"]}
    for name, a in args.items():
        assert run_cli(model, *a, *common, "--out", root / name) == 0
    return [root / name for name in args]


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    assert run_cli("report", *runs, "--out", out) == 0
    return out


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def _table(md: str) -> list[list[str]]:
    """The data rows of the first Markdown table."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def _pngs(html_text: str) -> list[np.ndarray]:
    from PIL import Image
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")).astype(int)
            for b in PNG_URI.findall(html_text)]


def _near(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    """How many pixels of ``img`` are within ``tol`` of colour ``rgb`` in every channel."""
    return int((np.abs(img - np.array(rgb)).max(-1) <= tol).sum())


# ---- report.json: per-tensor reconstruction error ----------------------------------------------------------

def test_report_json_has_each_tensors_reconstruction_error(runs, tiny_models):
    """rel_error equals ||W - Wq|| / ||W|| recomputed from the GGUF's bytes and the checkpoint, on the RTN
    (streamed chunks) and the GPTQ (calibration engine) paths."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from qcompile.model import Checkpoint, read_config
    ckpt = Checkpoint(tiny_models["qwen2"], read_config(tiny_models["qwen2"]))  # float32 from the bf16 file
    hf = {"blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight",
          "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
          "token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
    for run in runs:
        rep = _report(run)
        assert rep["schema_version"] == 2
        by_name = {t["name"]: t for t in rep["tensors"]}
        assert all(isinstance(t["rel_error"], float) for t in rep["tensors"])
        assert all(t["rel_error"] == 0.0 for t in rep["tensors"] if t["type"] == "F32")
        gguf = {t.name: t for t in GGUFReader(next(run.glob("*.gguf"))).tensors}
        for name, source in hf.items():
            w = ckpt.read(source)
            t = gguf[name]
            wq = dequantize(t.data, t.tensor_type).reshape(w.shape)
            expected = np.linalg.norm(w - wq) / np.linalg.norm(w)
            assert by_name[name]["rel_error"] == pytest.approx(expected, rel=1e-4), (run.name, name)
            assert by_name[name]["rel_error"] > 1e-4
    # Q8_0 reconstructs each matrix that Q4_0 stores in 4 bits far better (16x finer steps)
    q4, q8 = ({t["name"]: t for t in _report(r)["tensors"]} for r in (runs[0], runs[2]))
    four_bit = [n for n, t in q4.items() if t["type"] == "Q4_0"]
    assert len(four_bit) > 20 and all(q8[n]["rel_error"] < q4[n]["rel_error"] / 8 for n in four_bit)


# ---- report.md -----------------------------------------------------------------------------------------------

def test_markdown_table_has_one_row_per_run_with_the_reports_numbers(runs, page):
    rows = _table((page / "report.md").read_text())
    assert [r[0] for r in rows] == [r.name for r in runs]
    for row, run in zip(rows, runs):
        rep = _report(run)
        ref = rep["metrics"]["reference"]
        delta = ref["ppl_quant"] - ref["ppl_fp"]
        assert row == [run.name, "gguf", rep["target"]["scheme"], rep["target"]["method"],
                       f"{rep['artifact']['bytes'] / 2**20:.2f}", f"{rep['artifact']['bits_per_weight']:.2f}",
                       f"{ref['ppl_quant']:.3f}", f"{delta:+.3f} ({100 * delta / ref['ppl_fp']:+.2f}%)",
                       f"{ref['kld_mean']:.6f}", f"{100 * ref['top1']:.2f}%", f"{rep['timings_s']['total']:.1f}"]
    # and the numbers say what the methods should: Q8_0 is the largest and closest, GPTQ Q4_K_M beats RTN Q4_0
    size = {r[0]: float(r[4]) for r in rows}
    kld = {r[0]: float(r[8]) for r in rows}
    assert size["rtn-q4_0"] < size["gptq-q4_k_m"] < size["rtn-q8_0"]
    assert kld["rtn-q8_0"] < kld["gptq-q4_k_m"] < kld["rtn-q4_0"]
    assert [r[2:4] for r in rows] == [["Q4_0", "rtn"], ["Q4_K_M", "gptq"], ["Q8_0", "rtn"]]


def test_missing_metrics_print_as_dash(runs, tmp_path):
    rep = _report(runs[0])
    rep["metrics"] = {}
    del rep["timings_s"]["total"]
    (tmp_path / "noverify").mkdir()
    (tmp_path / "noverify" / "report.json").write_text(json.dumps(rep))
    assert run_cli("report", tmp_path / "noverify", runs[2] / "report.json", "--out", tmp_path / "out") == 0
    rows = _table((tmp_path / "out" / "report.md").read_text())
    assert rows[0][:6] == ["noverify", "gguf", "Q4_0", "rtn", f"{rep['artifact']['bytes'] / 2**20:.2f}",
                           f"{rep['artifact']['bits_per_weight']:.2f}"]
    assert rows[0][6:] == ["-"] * 5
    assert rows[1][0] == "rtn-q8_0" and "-" not in rows[1]
    assert "not verified (no quality metrics)" in (tmp_path / "out" / "report.html").read_text()


# ---- report.html ---------------------------------------------------------------------------------------------

def test_html_is_self_contained_with_both_plots(runs, page):
    text = (page / "report.html").read_text()
    assert not re.search(r"(?:src|href)=\"(?!data:)", text), "references a resource outside the page"
    assert "http://" not in text and "https://" not in text and "<script" not in text
    for run in runs:
        assert f"<td>{run.name}</td>" in text
    quality, layers = _pngs(text)
    assert quality.shape == layers.shape == (480, 800, 3)
    # quality vs size: methods sorted (gptq C0, rtn C1) -> a GPTQ point and two RTN points
    assert _near(quality, CYCLE[0]) > 50 and _near(quality, CYCLE[1]) > 100
    # per-layer error: one line per run in C0, C1, C2
    assert all(_near(layers, c) > 200 for c in CYCLE)


def test_output_is_deterministic_and_written_atomically(runs, page, tmp_path):
    assert run_cli("report", *runs, "--out", tmp_path) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.md"]  # no temp files left
    for name in ("report.md", "report.html"):
        assert (tmp_path / name).read_bytes() == (page / name).read_bytes()


def _chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def screenshot(page: Path, tmp_path: Path, height: int) -> np.ndarray:
    """The page as headless Chromium draws it in a 1280 x ``height`` window: RGB pixels (ints)."""
    from PIL import Image
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", f"--window-size=1280,{height}",
           page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium)")
def test_page_renders_in_headless_chromium(page, tmp_path):
    img = screenshot(page / "report.html", tmp_path, 2000)
    assert img.shape == (2000, 1280, 3)
    ink = img.min(-1) < 200                                   # anything not white or near-white
    colour = (img.max(-1) - img.min(-1)) > 80                  # saturated: the plots' markers and lines
    assert 0.005 < ink.mean() < 0.5, ink.mean()  # a page of text and two plots on white (~2% ink)
    # the table is text at the top; both plots drew below it: coloured pixels in the upper and lower half of
    # the page's plot region, each in matplotlib's colours
    rows = np.nonzero(colour.any(1))[0]
    assert colour.sum() > 2000 and rows.max() - rows.min() > 400
    for c in CYCLE:
        assert _near(img, c, tol=20) > 100, c


# ---- schema versions and errors ------------------------------------------------------------------------------

def test_version_1_reports_are_read_and_the_plot_says_so(runs, tmp_path):
    old = _report(runs[0])
    old["schema_version"] = 1
    for t in old["tensors"]:
        del t["rel_error"]
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "report.json").write_text(json.dumps(old))
    assert run_cli("report", tmp_path / "v1", runs[1], "--out", tmp_path / "out") == 0
    rows = _table((tmp_path / "out" / "report.md").read_text())
    assert [r[0] for r in rows] == ["v1", "gptq-q4_k_m"]
    assert rows[0][8] == f"{old['metrics']['reference']['kld_mean']:.6f}"
    text = (tmp_path / "out" / "report.html").read_text()
    assert "v1: " in text and "schema_version 1 (no per-tensor error data)" in text
    _, layers = _pngs(text)
    assert _near(layers, CYCLE[0]) > 200 and _near(layers, CYCLE[1]) < 20  # only the v2 run has a line
    # only version-1 reports: the per-layer plot is a note, no lines
    assert run_cli("report", tmp_path / "v1", "--out", tmp_path / "only-v1") == 0
    _, layers = _pngs((tmp_path / "only-v1" / "report.html").read_text())
    assert _near(layers, CYCLE[0]) < 20


def test_errors_are_one_line_with_an_exit_status(runs, tmp_path, capsys):
    newer = _report(runs[0])
    newer["schema_version"] = 99
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    cases = [(tmp_path / "missing", 1, "no such run directory"), (tmp_path / "empty", 1, "no report.json"),
             (tmp_path / "bad.json", 1, "not JSON"), (tmp_path / "newer.json", 2, "schema_version 99")]
    for arg, code, msg in cases:
        capsys.readouterr()
        assert run_cli("report", runs[0], arg, "--out", tmp_path / "out") == code, arg
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qcompile report: error: ") and msg in err[0], err
    assert not (tmp_path / "out").exists()  # nothing written when an input is bad


# ---- the example workflow -------------------------------------------------------------------------------------

def _qcompile_lines(workflow: dict) -> list[str]:
    """Every qcompile command line in the workflow's run: scripts (backslash continuations joined)."""
    lines = []
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            script = step.get("run", "").replace("\\\n", " ")
            lines += [ln.strip() for ln in script.splitlines() if ln.strip().startswith("qcompile ")]
    return lines


def test_example_workflow_commands_parse_with_our_parsers(monkeypatch):
    yaml = pytest.importorskip("yaml", reason="pyyaml is not installed")
    from qcompile import cli
    from quantizers.schemes import scheme
    workflow = yaml.safe_load(WORKFLOW.read_text())
    for key, value in workflow["env"].items():
        monkeypatch.setenv(key, str(value))
    seen = {}
    for line in _qcompile_lines(workflow):
        argv = [os.path.expandvars(a) for a in shlex.split(line, comments=True)[1:]]
        assert not any("$" in a for a in argv), line  # every variable is defined in the workflow's env
        if argv[0] in cli.COMMANDS:
            args = importlib.import_module(cli.COMMANDS[argv[0]]).build_parser().parse_args(argv[1:])
        else:
            args = cli.build_parser().parse_args(argv)
            scheme(args.quant)  # a real llama.cpp type
        seen[argv[0] if argv[0] in cli.COMMANDS else "compile"] = args
    assert set(seen) == {"compile", "report", "check"}
    compiled = seen["compile"].out
    assert compiled in seen["report"].runs and seen["check"].report == compiled / "report.json"
    assert seen["check"].baseline.parent in seen["report"].runs
    steps = [s for job in workflow["jobs"].values() for s in job["steps"]]
    upload = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert str(seen["report"].out) in upload["with"]["path"] and upload.get("if") == "always()"


def test_onnx_report_has_each_tensors_reconstruction_error(tiny_models, tmp_path):
    """The folder targets record rel_error too, keyed by Hugging Face name (lm_head: summed over row-chunks),
    and it is the error of what was written: the codes read back from model.onnx_data against the checkpoint."""
    from exporters.onnx import read_matmulnbits
    from qcompile.model import Checkpoint, read_config
    model = tiny_models["qwen2"]
    assert run_cli(model, "--to", "onnx", "--quant", "INT4_G128", "--method", "rtn", "--no-verify", "-q",
                   "--out", tmp_path) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    by_name = {t["name"]: t for t in rep["tensors"]}
    ckpt = Checkpoint(model, read_config(model))
    written = read_matmulnbits(tmp_path)  # the codes, scales and zero points in model.onnx_data
    for name in ("model.layers.2.mlp.down_proj.weight", "lm_head.weight"):
        w, wq = ckpt.read(name), written[name].dequantize()
        assert wq.shape == w.shape
        assert by_name[name]["rel_error"] == pytest.approx(np.linalg.norm(w - wq) / np.linalg.norm(w), rel=1e-4)
    assert by_name["lm_head.weight"]["type"] == "INT8_G128"
    assert by_name["lm_head.weight"]["rel_error"] < min(t["rel_error"] for t in rep["tensors"]
                                                        if t["type"] == "INT4_G128") / 4
