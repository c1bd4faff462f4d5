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
