"""The plan's predicted cost: ``--dry-run`` prints it and writes nothing; a run predicted not to fit in the
available memory is refused in one line naming the option that lowers it."""
from __future__ import annotations

from conftest import run_cli

from qcompile import cost
from qcompile.model import read_config


def test_dry_run_prints_every_stage_and_writes_nothing(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(tiny_models["qwen2"], "--bits", "4", "--calib", "self", "--max-size", "3MB", "--out", out,
                   "--dry-run") == 0
    text = capsys.readouterr().out
    for stage in ("self-calibration copy", "self-calibration", "sensitivity", "calibrated quantization",
                  "verify (PyTorch)", "verify (runtime)", "peak / total"):
        assert stage in text
    assert not out.exists()
    assert run_cli(tiny_models["qwen2"], "--to", "onnx", "--bits", "4", "--method", "rtn", "--no-verify",
                   "--out", out, "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[1:-1]] == ["quantize", "export"] and not out.exists()


def test_a_run_that_cannot_fit_is_refused_in_one_line(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cost, "available_memory", lambda: 100 << 20)
    out = tmp_path / "out"
    assert run_cli(tiny_models["qwen2"], "--bits", "4", "--calib", "self", "--out", out, "--no-verify") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("plan: peak memory ~") and len(err) == 2  # the plan, then one error line
    assert err[1].startswith("qcompile: error: predicted peak memory ")
    assert err[1].endswith("exceeds the 0.1 GB available; lower it with --calib FILE (or fewer --calib-samples), "
                           "or run anyway with --no-memory-check")
    assert not out.exists()
    assert run_cli(tiny_models["qwen2"], "--quant", "Q8_0", "--out", out, "--no-verify", "--no-memory-check",
                   "-q") == 0


def test_memory_terms_scale_with_the_model_not_the_layer_count(tiny_models):
    """Streaming stages: the predicted peak does not depend on the number of layers; a wider layer costs more."""
    s = cost.Shapes.of(read_config(tiny_models["qwen2"]))
    r = cost.Rates(*(1e9,) * 6)
    deeper = cost.Shapes(**{**s.__dict__, "layers": 10 * s.layers})
    wider = cost.Shapes(**{**s.__dict__, "inter": 4 * s.inter})
    for stage in (lambda x: cost.engine(x, r, 32, 256, True, False), lambda x: cost.sensitivity(x, r, 16, 512),
                  lambda x: cost.rtn_stream(x, r, rtn_s=0.0)):  # its reading time alone
        assert stage(deeper).anon == stage(s).anon
        assert stage(deeper).seconds > 5 * stage(s).seconds
    assert cost.engine(wider, r, 32, 256, True, False).anon > cost.engine(s, r, 32, 256, True, False).anon
