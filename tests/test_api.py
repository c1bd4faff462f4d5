"""qcompile.api, the small public API the benchmarks use: plan without running, compile, evaluate."""
from __future__ import annotations

import pytest

from qcompile import api


def test_plan_decides_everything_and_writes_nothing(tiny_models, tmp_path):
    job = api.plan(tiny_models["qwen2"], out=tmp_path / "never", bits=4, method="imatrix")
    # --bits 4 with a calibrated method: Q4_K_M's own size as the budget, its types as the base plan
    assert job.target.name == "gguf" and job.method.name == "imatrix"
    assert job.budget is not None and 0 < job.budget.bytes < job.n_params  # under 8 bits per weight
    assert {p.type.name for p in job.target.types.plan} >= {"Q4_K", "Q6_K"}
    assert job.scheme_name.startswith("MIX-") and job.cost.peak.anon > 0
    assert not (tmp_path / "never").exists()
    folder = api.plan(tiny_models["qwen3"], to="openvino", quant="INT8_PC")
    assert folder.target.name == "openvino" and folder.scheme_name == "INT8_PC" and folder.budget is None


def test_compile_and_evaluate(tiny_models, tmp_path):
    rep = api.compile(tiny_models["qwen2.5"], tmp_path, quant="Q8_0", quiet=True)
    gguf = tmp_path / rep["artifact"]["path"]
    assert gguf.is_file() and rep["metrics"]["reference"]["kld_mean"] < 1e-3
    text = tmp_path / "text.txt"
    from qcompile.tiny import builtin_text
    text.write_text(builtin_text())
    res = api.evaluate(tiny_models["qwen2.5"], text, gguf, runtime="pytorch", ctx=64, max_tokens=256)
    m = res["results"]["pytorch"]
    # the same file scored twice (compile's verification, eval's PyTorch path): the same kind of number
    assert m["tokens"] > 100 and 0 <= m["kld_mean"] < 1e-3 and m["top1"] > 0.9


def test_unknown_options_are_named():
    with pytest.raises(TypeError, match="bitz"):
        api.options("tiny", bitz=4)
