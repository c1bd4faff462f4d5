"""End to end on tiny checkpoints: report, determinism, streamed reference evaluation."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import hf_logits, rel_error, run_cli
from gguf import GGUFReader

from qcompile import evaluate
from qcompile.model import (
    Checkpoint,
    CheckpointSource,
    StreamedDecoder,
    decoder,
    read_config,
)


def test_streamed_decoder_matches_transformers(tiny_model, monkeypatch):
    """The layer-by-layer evaluator computes the same logits as the whole transformers model."""
    cfg = read_config(tiny_model)
    ckpt = Checkpoint(tiny_model, cfg)
    tokens = np.random.default_rng(0).integers(0, 700, (1, 48))
    dec = StreamedDecoder(cfg)
    src = CheckpointSource(ckpt)
    h = dec.embed(src, tokens)
    for i in range(cfg.num_layers):
        h = dec.layer(i, src, h)
    h = dec.final_norm(src, h)[0]
    monkeypatch.setattr(decoder, "HEAD_CHUNK_BYTES", 48 * 4 * 300)  # several vocabulary chunks
    got = np.concatenate([c.numpy() for _, c in dec.logits_chunks(src, h)], axis=1)
    assert rel_error(got, hf_logits(tiny_model, tokens[0].tolist())) < 1e-5


def test_online_softmax_metrics_equal_direct_computation(tiny_models, monkeypatch):
    """Chunked (online) log-sum-exp gives the same ppl/KLD/top-1 as full-vocabulary softmax."""
    import torch
    cfg = read_config(tiny_models["qwen2"])
    fp = CheckpointSource(Checkpoint(tiny_models["qwen2"], cfg))

    class Noisy:  # a "quantized" source: the same weights plus noise
        def __init__(self, src):
            self.src = src
        def shape(self, n):
            return self.src.shape(n)
        def _n(self, a, salt):
            return a + 0.02 * np.random.default_rng(salt).standard_normal(a.shape).astype(np.float32)
        def rows(self, n, a, b):
            return self._n(self.src.full(n).reshape(self.shape(n)[0], -1), len(n))[a:b]
        def take(self, n, ids):
            return self._n(self.src.full(n), len(n))[ids]
        def full(self, n):
            return self._n(self.src.full(n), len(n)).reshape(self.shape(n))

    windows = np.random.default_rng(1).integers(0, 700, (2, 40))
    q = Noisy(fp)
    monkeypatch.setattr(decoder, "HEAD_CHUNK_BYTES", 80 * 4 * 200)
    m, kept = evaluate.reference_eval(cfg, fp, q, windows, keep_logits=16)
    dec = StreamedDecoder(cfg)
    logits = []
    for src in (fp, q):
        h = dec.embed(src, windows)
        for i in range(cfg.num_layers):
            h = dec.layer(i, src, h)
        logits.append(dec.final_norm(src, h) @ torch.from_numpy(src.full("lm_head.weight")).T)
    lf, lq = (torch.log_softmax(x.double(), -1) for x in logits)
    kl = (lf.exp() * (lf - lq)).sum(-1)
    tgt = torch.from_numpy(windows[:, 1:])
    nll = lambda lp: float(-lp[:, :-1].gather(2, tgt[..., None]).mean())
    # every position that has a next token counts
    assert m.kld_mean == pytest.approx(float(kl[:, :-1].mean()), rel=1e-4)
    assert m.ppl_fp == pytest.approx(np.exp(nll(lf)), rel=1e-5)
    assert m.ppl_quant == pytest.approx(np.exp(nll(lq)), rel=1e-5)
    assert m.top1 == pytest.approx(float((lf.argmax(-1) == lq.argmax(-1))[:, :-1].double().mean()))
    # the runtime path (logits from a runtime, one window at a time) gives the same numbers
    by_window = {tuple(w): logits[1][k].numpy() for k, w in enumerate(windows)}
    r = evaluate.runtime_eval(cfg, fp, windows, None, lambda w: by_window[tuple(w)])
    for key in ("kld_mean", "ppl_fp", "ppl_quant", "top1"):
        assert getattr(r, key) == pytest.approx(getattr(m, key), rel=1e-5), key
    assert np.allclose(kept, logits[1][0, :16].numpy(), atol=1e-5)


def test_sliding_windows_score_every_token_once():
    ids = list(range(1000, 1100))
    for ctx, stride in [(32, 32), (32, 16), (40, 7), (200, None)]:
        w, score = evaluate.make_windows(ids, ctx, 10_000, stride)
        assert w.shape[1] == min(ctx, 100)
        nxt = np.concatenate([w[:, 1:], np.full((len(w), 1), -1)], axis=1)
        predicted = nxt[score].tolist()      # the token each scored position predicts
        assert len(set(predicted)) == len(predicted) and -1 not in predicted
        if stride and stride < ctx:          # overlapping windows: every token after the first, once
            assert sorted(predicted) == ids[1:]
        else:                                # disjoint windows: all but (at most) each window's first token
            assert set(predicted) <= set(ids[1:]) and len(predicted) >= len(ids) - len(w)
        # each scored prediction sees at least ctx - stride tokens of context (except in the first window)
        pos = np.nonzero(score)[1][np.nonzero(score)[0] > 0]
        assert pos.size == 0 or pos.min() >= min(ctx, 100) - (stride or ctx) - 1


def test_compile_writes_artifact_and_report(tiny_models, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(tiny_models["qwen3"], "--bits", "4", "--out", out, "-q") == 0
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2 and files[1] == "report.json"
    gguf = out / files[0]
    # --bits 4 is Q4_K_M's size, its types chosen by sensitivity (pipeline.preset_sized)
    assert re.fullmatch(r"qwen3-MIX-\d\.\d\dbpw\.gguf", gguf.name), gguf.name
    # both readable like any file the user makes (a temp file from mkstemp is 0600)
    assert (out / "report.json").stat().st_mode & 0o777 == gguf.stat().st_mode & 0o777
    rep = json.loads((out / "report.json").read_text())
    assert rep["schema_version"] == 2
    assert rep["model"]["architecture"] == "Qwen3ForCausalLM"
    alloc = rep["allocation"]
    assert alloc["request"] == "--bits 4 (the size of Q4_K_M)"
    assert alloc["bytes"] <= alloc["budget_bytes"] == alloc["base_bytes"]
    assert alloc["predicted_kld"] <= alloc["base_predicted_kld"]
    assert rep["target"]["scheme"] == gguf.name[len("qwen3-"):-len(".gguf")]
    assert rep["artifact"]["bytes"] == gguf.stat().st_size == alloc["bytes"]
    assert len(rep["artifact"]["sha256"]) == 64
    r = rep["metrics"]["reference"]
    assert 0 < r["kld_mean"] < 0.5 and 0.3 < r["top1"] <= 1 and r["ppl_quant"] > 1
    # tensor types in the file are the ones the report lists
    types = {t.name: t.tensor_type.name for t in GGUFReader(gguf).tensors}
    assert types == {t["name"]: t["type"] for t in rep["tensors"]}
    assert "blk.0.attn_q_norm.weight" in types


def test_same_inputs_give_identical_files(tiny_models, tmp_path):
    for d in ("a", "b"):
        assert run_cli(tiny_models["qwen2"], "--quant", "Q4_K_M", "--out", tmp_path / d, "-q", "--no-verify") == 0
    a, b = (tmp_path / d / "qwen2-Q4_K_M.gguf" for d in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()


def test_row_chunking_does_not_change_bytes(tiny_models, tmp_path, monkeypatch):
    """Streaming in tiny row-chunks writes the same file as whole-tensor chunks."""
    import qcompile.model.checkpoint as ck
    assert run_cli(tiny_models["qwen2.5"], "--quant", "Q6_K", "--out", tmp_path / "a", "-q", "--no-verify") == 0
    monkeypatch.setattr(ck, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(ck.Checkpoint.iter_rows, "__defaults__", (4096,))
    assert run_cli(tiny_models["qwen2.5"], "--quant", "Q6_K", "--out", tmp_path / "b", "-q", "--no-verify") == 0
    assert (tmp_path / "a" / "qwen2.5-Q6_K.gguf").read_bytes() == (tmp_path / "b" / "qwen2.5-Q6_K.gguf").read_bytes()


def test_verification_metrics_are_zero_for_lossless(tiny_models, tmp_path):
    assert run_cli(tiny_models["qwen2"], "--quant", "F32", "--out", tmp_path, "-q") == 0
    r = json.loads((tmp_path / "report.json").read_text())["metrics"]["reference"]
    assert abs(r["kld_mean"]) < 1e-6 and r["top1"] == 1.0 and r["ppl_fp"] == pytest.approx(r["ppl_quant"], rel=1e-5)


def test_eval_text_option(tiny_models, tmp_path):
    text = tmp_path / "held-out.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    assert run_cli(tiny_models["qwen2"], "--bits", "8", "--out", tmp_path / "o", "-q", "--eval-text", text,
                   "--eval-ctx", "64", "--eval-tokens", "256") == 0
    r = json.loads((tmp_path / "o" / "report.json").read_text())["metrics"]["reference"]
    assert r["ctx"] == 64 and r["tokens"] <= 256 and r["kld_mean"] < 0.01


def test_tiny_alias_builds_and_compiles(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    assert run_cli("tiny", "--bits", "8", "--out", tmp_path / "o") == 0
    out = capsys.readouterr().out
    assert "tiny-qwen2.5-Q8_0.gguf" in out and "mean KLD" in out
