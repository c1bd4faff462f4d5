"""Calibrated quantization: sources, the layer-by-layer engine, GPTQ on GGUF grids, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from conftest import run_cli
from calibration import capture, sources
from qcompile.errors import QCompileError
from quantizers import CalibStats, QUANTIZERS
from quantizers.gptq import gptq
from quantizers.rtn import quantize as rtn


def correlated_problem(seed=0, rows=256, cols=512, n=4096):
    """Weights and activations with correlated, unevenly scaled input channels (like real layers)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((cols, cols)).astype(np.float32) / np.sqrt(cols)
    x = (rng.standard_normal((n, cols)).astype(np.float32) @ mix) * rng.uniform(0.2, 3, cols).astype(np.float32)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    return w, x


def out_err(x, w, q):
    return float(np.linalg.norm(x @ (q.dequantize() - w).T) / np.linalg.norm(x @ w.T))


@pytest.mark.parametrize("t", [T.Q4_K, T.Q4_0, T.Q5_K, T.Q6_K, T.IQ4_XS])
def test_gptq_beats_rtn_by_20_percent_on_the_same_grid(t):
    w, x = correlated_problem()
    h = x.T @ x / len(x)
    e_rtn = out_err(x, w, rtn("w", w, t))
    e_gptq = out_err(x, w, gptq("w", w, h, t))
    e_act = out_err(x, w, gptq("w", w, h, t, act_order=True))
    assert e_gptq <= 0.8 * e_rtn, (e_gptq, e_rtn)
    assert e_act <= 0.8 * e_rtn, (e_act, e_rtn)


def test_gptq_output_is_exactly_on_the_grid():
    """The packed bytes decode (ggml) to the values GPTQ chose; re-rounding them changes nothing."""
    w, x = correlated_problem(1, rows=64)
    q = gptq("w", w, x.T @ x, T.Q4_K)
    f = q.fields()
    scale, offset = f.scale_offset()
    assert np.array_equal(f.grid.nearest_codes(q.dequantize(), scale, offset), f.codes)


def test_imatrix_rtn_beats_plain_rtn():
    w, x = correlated_problem(2)
    st = CalibStats(x.T @ x / len(x))
    assert out_err(x, w, QUANTIZERS["imatrix"].quantize("w", w, T.Q4_K, st)) < out_err(x, w, rtn("w", w, T.Q4_K))


def test_token_windows_deterministic_and_too_short():
    ids = list(range(10_000))
    a = sources.token_windows(ids, 8, 100, seed=3, what="x")
    assert a.shape == (8, 100) and np.array_equal(a, sources.token_windows(ids, 8, 100, seed=3, what="x"))
    assert not np.array_equal(a, sources.token_windows(ids, 8, 100, seed=4, what="x"))
    with pytest.raises(QCompileError, match="need at least 12800"):
        sources.token_windows(ids, 128, 100, seed=0, what="x")


def test_sources_text_jsonl_folder(tiny_models, tmp_path):
    d = tiny_models["qwen2.5"]
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "a json text"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    docs = sources.texts(str(tmp_path), d)
    assert docs[0] == "plain text file" and docs[1] == "a json text"
    assert docs[2] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    (tmp_path / "bad.jsonl").write_text('{"nope": 1}\n')
    with pytest.raises(QCompileError, match="bad.jsonl:1"):
        sources.texts(str(tmp_path / "bad.jsonl"), d)
    with pytest.raises(QCompileError, match="no such file"):
        sources.texts(str(tmp_path / "missing.txt"), d)


def _calib_file(tmp_path):
    from qcompile.tiny import builtin_text
    p = tmp_path / "calib.txt"
    p.write_text(builtin_text() * 6)
    return p


def test_gptq_run_is_deterministic_and_better_than_rtn(tiny_models, tmp_path):
    calib = _calib_file(tmp_path)
    args = ["--quant", "Q4_K_M", "--calib", calib, "--calib-samples", "8", "--calib-seqlen", "128", "-q"]
    for d in ("a", "b"):
        assert run_cli(tiny_models["qwen2"], *args, "--method", "gptq", "--out", tmp_path / d) == 0
    assert (tmp_path / "a" / "qwen2-Q4_K_M.gguf").read_bytes() == (tmp_path / "b" / "qwen2-Q4_K_M.gguf").read_bytes()
    assert run_cli(tiny_models["qwen2"], *args, "--method", "rtn", "--out", tmp_path / "r") == 0
    kld = lambda d: json.loads((tmp_path / d / "report.json").read_text())["metrics"]["reference"]["kld_mean"]
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["target"]["method"] == "gptq" and "calib.txt" in rep["calibration"]
    assert kld("a") < kld("r")


def test_interrupted_gptq_resumes_to_the_identical_file(tiny_models, tmp_path, monkeypatch):
    calib = _calib_file(tmp_path)
    args = [tiny_models["qwen3"], "--quant", "Q4_K_M", "--method", "gptq", "--calib", calib, "--calib-samples", "8",
            "--calib-seqlen", "128", "-q", "--no-verify"]
    assert run_cli(*args, "--out", tmp_path / "clean") == 0
    real_layer = capture.LayerwiseEngine.layer
    calls = []

    def interrupt_at_layer_2(self, i):
        if i == 2 and self.done == 1:
            calls.append(i)
            raise KeyboardInterrupt
        return real_layer(self, i)
    monkeypatch.setattr(capture.LayerwiseEngine, "layer", interrupt_at_layer_2)
    assert run_cli(*args, "--out", tmp_path / "r") == 1 and calls == [2]
    assert not list((tmp_path / "r").glob("*.gguf"))
    monkeypatch.setattr(capture.LayerwiseEngine, "layer", real_layer)
    computed = []
    monkeypatch.setattr(capture.LayerwiseEngine, "_collect",
                        lambda self, m, _c=capture.LayerwiseEngine._collect: computed.append(1) or _c(self, m))
    assert run_cli(*args, "--out", tmp_path / "r", "--resume") == 0
    assert len(computed) == 2  # only layers 2 and 3 were recomputed
    assert (tmp_path / "r" / "qwen3-Q4_K_M.gguf").read_bytes() == (tmp_path / "clean" / "qwen3-Q4_K_M.gguf").read_bytes()
    assert not any(p.name.endswith(".resume") for p in (tmp_path / "r").iterdir())


def test_default_bits4_uses_self_calibration_offline(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_cli(tiny_models["qwen2.5"], "--bits", "4", "--out", tmp_path, "--calib-samples", "4",
                   "--calib-seqlen", "32", "--no-verify") == 0
    err = capsys.readouterr().err
    assert "calibration: self-generated" in err and "offline default" in err
    assert json.loads((tmp_path / "report.json").read_text())["target"]["method"] == "gptq"
