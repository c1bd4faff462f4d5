"""``qcompile check``: the CI gate passes a run against itself and fails a worse method, with reasons."""
from __future__ import annotations

import json

import pytest
from conftest import run_cli


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """Two compiles of the same tiny model: GPTQ Q4_K_M (the baseline) and plain RTN Q4_0 (worse)."""
    root = tmp_path_factory.mktemp("runs")
    model = tiny_models["qwen2"]
    assert run_cli(model, "--quant", "Q4_K_M", "--method", "gptq", "--calib", "self", "--calib-samples", "8",
                   "--calib-seqlen", "64", "--out", root / "gptq", "-q") == 0
    assert run_cli(model, "--quant", "Q4_0", "--method", "rtn", "--out", root / "rtn", "-q") == 0
    return root / "gptq" / "report.json", root / "rtn" / "report.json"


def test_passes_against_its_own_baseline(runs, capsys):
    base, _ = runs
    assert run_cli("check", base, "--baseline", base) == 0
    out = capsys.readouterr().out
    assert out.count("ok: ") == 4 and "mean KLD" in out and "size bytes" in out


def test_fails_a_worse_method_with_one_reason_per_budget(runs, capsys):
    base, worse = runs
    assert run_cli("check", worse, "--baseline", base, "--max-size", "+50%") == 1
    err = capsys.readouterr().err.strip().splitlines()
    kld = json.loads(worse.read_text())["metrics"]["reference"]["kld_mean"]
    assert any(line.startswith("qcompile check: mean KLD regressed: ") and f"{kld:.6g}" in line for line in err)
    assert not any("size" in line for line in err)  # Q4_0 is smaller: within the size budget
    # absolute budgets: a generous KLD ceiling and perplexity slack let it through, a tight size ceiling not
    assert run_cli("check", worse, "--baseline", base, "--max-kld", "10", "--max-ppl-increase", "1000%",
                   "--max-top1-drop", "100", "--max-size", "1KB") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qcompile check: size bytes regressed")


def test_bad_input_is_one_line_and_exit_1(runs, tmp_path, capsys):
    base, _ = runs
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    assert run_cli("check", bad, "--baseline", base) == 1
    assert run_cli("check", tmp_path / "missing.json", "--baseline", base) == 1
    assert run_cli("check", base, "--baseline", base, "--max-size", "12 parsecs") == 1
    other = json.loads(base.read_text())
    other["metrics"]["reference"]["tokens"] += 1
    (tmp_path / "o.json").write_text(json.dumps(other))
    assert run_cli("check", tmp_path / "o.json", "--baseline", base) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("qcompile check: error: ") for line in err)
    assert "not comparable" in err[3]


def test_compile_gate_publishes_nothing_on_a_regression(runs, tiny_models, tmp_path, capsys):
    """``--max-kld`` / ``--baseline`` on the compile itself: the measured figure fails it (exit 1, no artifact,
    no report), the same run within budget publishes with the passed budgets in report.json."""
    base, worse = runs
    model = tiny_models["qwen2"]
    kld = json.loads(worse.read_text())["metrics"]["reference"]["kld_mean"]
    # the RTN Q4_0 run again, against the GPTQ baseline it is worse than: refused with the measured KLD
    out = tmp_path / "gated"
    assert run_cli(model, "--quant", "Q4_0", "--method", "rtn", "--out", out, "-q", "--baseline", base) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qcompile: error: quality gate failed: mean KLD regressed: ")
    assert f"{kld:.6g}" in err[0]
    assert not out.exists() or not any(out.iterdir())  # nothing published, no temp left
    # an absolute ceiling just under the measured KLD fails it; just over it passes and is recorded
    assert run_cli(model, "--quant", "Q4_0", "--method", "rtn", "--out", out, "-q", "--max-kld", f"{kld * 0.99:.6g}") == 1
    assert not out.exists() or not any(out.iterdir())
    capsys.readouterr()
    assert run_cli(model, "--quant", "Q4_0", "--method", "rtn", "--out", out, "-q", "--max-kld", f"{kld * 1.01:.6g}") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["reference"]["kld_mean"] == kld  # deterministic: the same figure as the first run
    assert rep["gate"]["baseline"] is None and rep["gate"]["passed"][0].startswith("mean KLD")
    # against its own report as the baseline: every budget of `qcompile check` holds
    again = tmp_path / "again"
    assert run_cli(model, "--quant", "Q4_0", "--method", "rtn", "--out", again, "-q", "--baseline", worse) == 0
    assert len(json.loads((again / "report.json").read_text())["gate"]["passed"]) == 4


def test_compile_gate_bad_budgets_fail_before_any_work(runs, tiny_models, tmp_path, capsys):
    base, _ = runs
    model = tiny_models["qwen2"]
    out = tmp_path / "o"
    assert run_cli(model, "--bits", "4", "--out", out, "--max-kld", "0.1", "--no-verify") == 2
    assert run_cli(model, "--bits", "4", "--out", out, "--max-kld", "+5%") == 2        # relative, no baseline
    assert run_cli(model, "--bits", "4", "--out", out, "--max-top1-drop", "1") == 2    # relative, no baseline
    assert run_cli(model, "--bits", "4", "--out", out, "--baseline", tmp_path / "none.json") == 1
    assert run_cli(model, "--bits", "4", "--out", out, "--baseline", base, "--eval-ctx", "64") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("qcompile: error: ") for line in err)
    assert "not comparable" in err[4]
    assert not out.exists() or not any(out.iterdir())


def test_compile_gate_on_a_folder_target_removes_its_files(tiny_models, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert run_cli(tiny_models["qwen2"], "--to", "onnx", "--bits", "4", "--method", "rtn", "--out", out, "-q",
                   "--max-kld", "1e-9") == 1
    assert "quality gate failed: mean KLD regressed" in capsys.readouterr().err
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
