"""``--max-size`` / ``--target-bpw``: sensitivity predicts KLD, the file meets the budget exactly, a bigger
budget is no worse, and bad budgets are one-line errors."""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, replace

import numpy as np
import pytest
from conftest import TINY_MODELS, run_cli
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from test_bad_input import _fail

from calibration import sensitivity as sens
from qcompile import evaluate
from qcompile.budget import parse_budget
from qcompile.errors import QCompileError
from qcompile.model import (
    Checkpoint,
    CheckpointSource,
    QuantizedSource,
    StreamedDecoder,
    read_config,
)
from qcompile.tiny import builtin_text
from qcompile.units import parse_size
from quantizers import rtn
from quantizers.allocate import Option, lower_hull
from quantizers.gptq import gptq
from quantizers.grids import Target
from quantizers.schemes import candidate_types


def spearman(a: list[float], b: list[float]) -> float:
    rank = lambda x: np.argsort(np.argsort(x))
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(builtin_text())
    return p


def calib_args(calib_file) -> list:
    return ["--calib", calib_file, "--calib-samples", 4, "--calib-seqlen", 96]


@dataclass
class WholeGraphFisher:
    diag: dict[str, np.ndarray]
    sq_mean: dict[str, np.ndarray]
    sequences: int
    tokens: int


def whole_graph_fisher(cfg, source, tokens: np.ndarray, names: list[str], seed: int = 0) -> WholeGraphFisher:
    """The reference: the former product code, which held every float32 layer with gradients and a
    Fisher accumulator for every analysed tensor at once (one backward pass per window through all)."""
    import torch
    dec = StreamedDecoder(cfg)
    wanted = set(names)
    params, sq_sum, layers, hooks = {}, {}, [], []

    def record(name):
        def hook(_mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            sq_sum[name] = sq_sum.get(name, 0) + x.square().sum(0)
        return hook

    for i in range(cfg.num_layers):
        layer = dec.build_layer(i, source)
        for rel, p in layer.named_parameters():
            full = f"model.layers.{i}.{rel}"
            p.requires_grad_(full in wanted)
            if full in wanted:
                params[full] = p
        for lin in cfg.arch.LINEARS:
            hooks.append(layer.get_submodule(lin).register_forward_pre_hook(record(f"model.layers.{i}.{lin}.weight")))
        layers.append(layer)
    norm = dec.build_norm(source).requires_grad_(False)
    head = torch.from_numpy(np.ascontiguousarray(source.full(dec.head_name), dtype=np.float32))
    if cfg.head_name in wanted:
        params[cfg.head_name] = head.requires_grad_(True)
    assert set(params) == wanted
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    for s in range(tokens.shape[0]):
        with torch.enable_grad():
            h = dec.embed(source, tokens[s:s + 1])
            for layer in layers:
                h = dec.forward_layer(layer, h)
            normed = norm(h)[0]
            if cfg.head_name in wanted:  # the output matrix's imatrix: its final-normed input
                sq_sum[cfg.head_name] = sq_sum.get(cfg.head_name, 0) + normed.detach().square().sum(0)
            logp = torch.log_softmax(normed @ head.T, dim=-1)
            y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
            logp.gather(1, y).sum().backward()
        for n, p in params.items():
            acc[n].addcmul_(p.grad, p.grad)
            p.grad = None
    for hk in hooks:
        hk.remove()
    n_tok = int(tokens.size)
    return WholeGraphFisher({n: (a / n_tok).numpy() for n, a in acc.items()},
                            {n: (v / n_tok).numpy() for n, v in sq_sum.items()}, int(tokens.shape[0]), n_tok)


def whole_graph_sensitivity(source, fisher: WholeGraphFisher, types: dict[str, list[Target]],
                            use_imatrix: bool) -> dict[str, dict[Target, float]]:
    out = {}
    for name, cands in types.items():
        w = np.ascontiguousarray(source.full(name), dtype=np.float32)
        imp = fisher.sq_mean.get(name) if use_imatrix else None
        out[name] = {t: sens.predicted_kld(name, w, fisher.diag[name], t, imp) for t in cands}
    return out


def analysed(cfg) -> list[str]:
    """Every decoder linear, and the output matrix when it is not the embedding table."""
    names = cfg.decoder_linears()
    return names + ([] if cfg.tie_word_embeddings else [cfg.head_name])


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_streamed_sensitivity_equals_the_whole_graph_fisher(tiny_models, name, monkeypatch):
    """One layer at a time (inputs saved, gradients passed down, the vocabulary in chunks) predicts what
    the whole graph with every layer's Fisher in memory predicted: same labels, same estimator."""
    model = tiny_models[name]
    cfg = read_config(model)
    src = CheckpointSource(Checkpoint(model, cfg))
    windows = np.asarray(evaluate.tokenize(model, builtin_text())[:5 * 64]).reshape(5, 64)
    names = analysed(cfg)
    types = {n: candidate_types(src.shape(n)[-1]) for n in names}
    monkeypatch.setattr(sens, "BF16", False)  # the reference graph is float32: the estimator, exactly
    monkeypatch.setattr(sens, "ROW_SAMPLE", 1)  # every row (the row sample: its own test)
    # several vocabulary chunks, the last one short; the forward pass in batches of 2 windows
    rows = 300
    monkeypatch.setattr(sens, "HEAD_CHUNK_BYTES", 4 * rows * max(windows.size, cfg.hidden_size))
    monkeypatch.setattr(sens, "FORWARD_TOKENS", 2 * windows.shape[1])
    ticks: list[str] = []
    got = sens.sensitivity(cfg, src, windows, types, use_imatrix=True, seed=3, progress=ticks.append)
    ref = whole_graph_fisher(cfg, src, windows, names, seed=3)
    assert len(ticks) == len(windows) + len(names)  # the pipeline's progress bar counts on it
    assert (got.sequences, got.tokens) == (ref.sequences, ref.tokens) == (5, 320)
    assert got.sq_mean.keys() == ref.sq_mean.keys()
    for n, v in ref.sq_mean.items():
        np.testing.assert_allclose(got.sq_mean[n], v, rtol=1e-5, err_msg=n)
    # ggml's imatrix-weighted scale search is discontinuous: float-rounding differences of the imatrix
    # (1e-7) move some predictions by 1e-3. Given the same imatrix, the Fisher alone must agree.
    want = whole_graph_sensitivity(src, replace(ref, sq_mean=got.sq_mean), types, use_imatrix=True)
    assert list(got.predicted) == names
    for n in names:
        for t in types[n]:
            assert got.predicted[n][t] == pytest.approx(want[n][t], rel=1e-5, abs=0), (n, t)
    # a part of the model alone (no gradient below its lowest layer): the same numbers
    part = {n: types[n] for n in names[9:12]}
    alone = sens.sensitivity(cfg, src, windows, part, use_imatrix=False, seed=3)
    plain = whole_graph_sensitivity(src, ref, part, use_imatrix=False)
    for n in part:
        for t in part[n]:
            assert alone.predicted[n][t] == pytest.approx(plain[n][t], rel=1e-5, abs=0), (n, t)
    with pytest.raises(ValueError, match="no such weights"):
        sens.sensitivity(cfg, src, windows, {"model.layers.0.input_layernorm.weight": [T.Q8_0]}, use_imatrix=False)


def test_gptq_head_prediction_is_rtns_times_the_measured_output_error_ratio(tiny_models):
    """With gptq_head the output matrix's prediction is the RTN one scaled by GPTQ's output-error ratio on
    the final-normed states, measured directly here on every row; the decoder linears are untouched."""
    model = tiny_models["qwen2"]
    cfg = read_config(model)
    src = CheckpointSource(Checkpoint(model, cfg))
    windows = np.asarray(evaluate.tokenize(model, builtin_text())[:4 * 64]).reshape(4, 64)
    types = {n: candidate_types(src.shape(n)[-1]) for n in (cfg.head_name, "model.layers.1.mlp.down_proj.weight")}
    plain = sens.sensitivity(cfg, src, windows, types, use_imatrix=False, seed=1)
    matched = sens.sensitivity(cfg, src, windows, types, use_imatrix=False, gptq_head=True, seed=1)
    assert matched.predicted["model.layers.1.mlp.down_proj.weight"] == plain.predicted["model.layers.1.mlp.down_proj.weight"]
    dec = StreamedDecoder(cfg)
    h = dec.embed(src, windows)
    for i in range(cfg.num_layers):
        h = dec.layer(i, src, h)
    x = dec.final_norm(src, h).reshape(-1, cfg.hidden_size).double().numpy()
    w = src.full(cfg.head_name)
    gram = (x.T @ x / len(x)).astype(np.float32)
    for t in types[cfg.head_name]:
        err = lambda q: float(np.square((q.dequantize() - w) @ x.T).sum())
        ratio = err(gptq(cfg.head_name, w, gram.copy(), t)) / err(rtn.quantize(cfg.head_name, w, t))
        assert ratio < 0.8, t  # GPTQ's gain on the head is large: the proxy must not spend bytes on it
        assert matched.predicted[cfg.head_name][t] == pytest.approx(plain.predicted[cfg.head_name][t] * ratio, rel=0.05), t


def test_row_sampled_prediction_matches_every_row():
    """One row in 8 (the ratio to Q8_0 on every row) predicts each type within 3% of all rows, and the gap
    between two types within 5%, on a tensor whose rows' Fisher spans orders of magnitude (where scaling
    the sample by the row count is off by 30%); the same numbers every call; a small tensor: every row."""
    rng = np.random.default_rng(1)
    rows, cols = 1024, 1536
    w = (rng.standard_normal((rows, cols)) * np.exp(rng.normal(0, 0.5, (rows, 1))) * 0.02).astype(np.float32)
    f = (rng.random((rows, cols)) * np.exp(rng.normal(0, 1.5, (rows, 1)))
         * np.exp(rng.normal(0, 1, (1, cols)))).astype(np.float32)
    imp = np.exp(rng.normal(0, 1, cols)).astype(np.float32)
    types = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0]
    name = "model.layers.3.mlp.up_proj.weight"
    got = sens.predict_types(name, w, f, types, imp)
    exact = {t: sens.predicted_kld(name, w, f, t, imp) for t in types}
    assert got == sens.predict_types(name, w, f, types, imp)
    assert got[T.Q8_0] == pytest.approx(exact[T.Q8_0], rel=1e-9)  # the reference: every row
    for t in types[:3]:
        assert got[t] != exact[t] and got[t] == pytest.approx(exact[t], rel=0.03), t
    assert got[T.Q4_K] - got[T.Q5_K] == pytest.approx(exact[T.Q4_K] - exact[T.Q5_K], rel=0.05)
    pick = np.sort(np.random.default_rng(zlib.crc32(name.encode())).choice(rows, rows // 8, replace=False))
    scaled = 8 * sens.predicted_kld(name, w[pick], f[pick], T.Q4_K, imp)
    assert abs(scaled / exact[T.Q4_K] - 1) > 0.1  # why the ratio: plain scaling is far off here
    small = w[:sens.ROW_SAMPLE * sens.MIN_SAMPLED_ROWS - 1]
    fs = f[:len(small)]
    assert sens.predict_types(name, small, fs, types, imp) == {t: sens.predicted_kld(name, small, fs, t, imp)
                                                               for t in types}


def test_predicted_kld_ranks_tensors_as_measured(tiny_models):
    """Quantizing one tensor at a time to Q4_K: the Fisher prediction (on the first half of the text) and
    the KLD measured on the second half rank the 29 tensors alike and agree in total within 2x."""
    model = tiny_models["qwen2"]
    cfg = read_config(model)
    src = CheckpointSource(Checkpoint(model, cfg))
    ids = evaluate.tokenize(model, builtin_text())
    half = len(ids) // 2
    names = analysed(cfg)
    res = sens.sensitivity(cfg, src, np.asarray(ids[:6 * 96]).reshape(6, 96), {n: [T.Q4_K] for n in names},
                           use_imatrix=False)
    pred = res.predicted
    windows, score = evaluate.make_windows(ids[half:], 128, 640)
    measured = {}
    for n in names:
        single = QuantizedSource(src, {n: rtn.quantize(n, src.full(n), T.Q4_K)})
        measured[n] = evaluate.reference_eval(cfg, src, single, windows, score=score)[0].kld_mean
    import torch
    assert torch.is_grad_enabled()  # the reference evaluation left grad mode as it found it
    p, m = [pred[n][T.Q4_K] for n in names], [measured[n] for n in names]
    assert spearman(p, m) > 0.9, list(zip(names, p, m))
    assert 0.5 < sum(p) / sum(m) < 2
    # the imatrix seen on the way is each linear's mean squared input: q/k/v share theirs
    sq = res.sq_mean
    assert np.allclose(sq["model.layers.1.self_attn.q_proj.weight"], sq["model.layers.1.self_attn.v_proj.weight"])
    assert (sq["model.layers.1.mlp.down_proj.weight"] > 0).all()


def test_bfloat16_layers_predict_what_float32_predicts(tiny_models, monkeypatch):
    """The decoder layers under bfloat16 autocast (the default, for speed) predict each (tensor, type) as
    float32 does, to a few percent, and rank them alike; the imatrix seen on the way agrees too."""
    model = tiny_models["qwen2.5"]
    cfg = read_config(model)
    src = CheckpointSource(Checkpoint(model, cfg))
    windows = np.asarray(evaluate.tokenize(model, builtin_text())[:4 * 96]).reshape(4, 96)
    names = analysed(cfg)
    types = {n: candidate_types(src.shape(n)[-1]) for n in names}
    got = {}
    for bf16 in (True, False):
        monkeypatch.setattr(sens, "BF16", bf16)
        got[bf16] = sens.sensitivity(cfg, src, windows, types, use_imatrix=False, seed=1)
    fast, exact = got[True], got[False]
    p = [fast.predicted[n][t] for n in names for t in types[n]]
    q = [exact.predicted[n][t] for n in names for t in types[n]]
    assert p != q  # autocast is on: the numbers do differ
    assert spearman(p, q) > 0.99
    assert sum(p) == pytest.approx(sum(q), rel=0.05)
    for n in names:
        np.testing.assert_allclose(fast.sq_mean[n], exact.sq_mean[n], rtol=0.05, atol=1e-6, err_msg=n)


def test_budget_is_met_exactly_and_deterministically(tiny_models, calib_file, tmp_path):
    """Between the smallest and the largest mix: the file fits, the size model is exact (the report's
    planned bytes are the file's), the leftover is smaller than any upgrade, and a rerun is byte-identical."""
    model = tiny_models["qwen3"]
    budget = 2_700_000
    for d in ("a", "b"):
        assert run_cli(model, "--max-size", budget, *calib_args(calib_file), "--method", "rtn",
                       "--out", tmp_path / d, "-q", "--no-verify") == 0
    a, b = (next((tmp_path / d).glob("*.gguf")) for d in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    alloc = rep["allocation"]
    size = a.stat().st_size
    assert size == rep["artifact"]["bytes"] == alloc["bytes"] <= budget == alloc["budget_bytes"]
    assert alloc["smallest_bytes"] < budget < alloc["largest_bytes"]
    # the types in the file are the chosen ones, each one of the tensor's candidates
    in_file = {t.name: t.tensor_type.name for t in GGUFReader(a).tensors}
    assert {n: t["type"] for n, t in alloc["tensors"].items()} == {n: in_file[n] for n in alloc["tensors"]}
    assert {t["name"]: t["type"] for t in rep["tensors"]} == in_file
    for name, t in alloc["tensors"].items():
        assert t["type"] in t["options"]
    assert "output.weight" in alloc["tensors"] and "token_embd.weight" not in alloc["tensors"]
    # the budget is spent: no tensor's next upgrade (along its hull, as the greedy moves) would still fit
    steps = []
    for t in alloc["tensors"].values():
        hull = lower_hull([Option(k, o["bytes"], o["predicted_kld"]) for k, o in t["options"].items()])
        k = [o.type for o in hull].index(t["type"])
        steps += [hull[k + 1].bytes - hull[k].bytes] if k + 1 < len(hull) else []
    assert steps and budget - size < min(steps)
    assert rep["target"]["scheme"] == "MIX-4.95bpw" and rep["target"]["base_scheme"] == "Q4_K_M"
    assert alloc["predicted_kld_lower_bound"] <= alloc["predicted_kld"]


def test_a_bigger_budget_measures_no_worse_and_beats_the_preset_at_its_size(tiny_models, calib_file, tmp_path):
    """Measured (PyTorch reference) KLD: plain Q4_K_M > --max-size of that same size > a bigger budget."""
    model = tiny_models["qwen2"]
    assert run_cli(model, "--quant", "Q4_K_M", "--method", "rtn", "--out", tmp_path / "plain", "-q") == 0
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    size = plain["artifact"]["bytes"]
    klds = []
    for d, budget in (("same", f"{size}"), ("bigger", f"{size * 1.15 / 2**20:.4f}MiB")):
        assert run_cli(model, "--max-size", budget, *calib_args(calib_file), "--method", "rtn",
                       "--out", tmp_path / d, "-q") == 0
        rep = json.loads((tmp_path / d / "report.json").read_text())
        assert rep["artifact"]["bytes"] <= parse_size(budget, "")
        klds.append(rep["metrics"]["reference"]["kld_mean"])
        # the base mix is one of the allocations considered: the greedy predicts no worse than it
        assert rep["allocation"]["predicted_kld"] <= rep["allocation"]["base_predicted_kld"]
        # and the prediction of the base mix is the measured KLD within 2x
        assert 0.5 < rep["allocation"]["base_predicted_kld"] / plain["metrics"]["reference"]["kld_mean"] < 2
    assert plain["metrics"]["reference"]["kld_mean"] > klds[0] >= klds[1]


def test_target_bpw_counts_bits_over_all_parameters(tiny_models, calib_file, tmp_path):
    model = tiny_models["qwen2.5"]  # tied: the embedding table keeps its type, only the linears are chosen
    assert run_cli(model, "--target-bpw", "5.5", *calib_args(calib_file), "--method", "imatrix",
                   "--out", tmp_path, "-q", "--no-verify") == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["artifact"]["bits_per_weight"] <= 5.5
    assert rep["allocation"]["budget_bytes"] == int(5.5 * rep["model"]["parameters"] / 8)
    assert "imatrix-weighted" in rep["allocation"]["sensitivity"]["method"]
    assert not any(n in rep["allocation"]["tensors"] for n in ("output.weight", "token_embd.weight"))
    assert rep["target"]["method"] == "imatrix" and rep["calibration"].startswith(str(calib_file))


def test_budget_errors_are_one_line(tiny_models, calib_file, tmp_path, capsys):
    model = tiny_models["qwen2"]
    out = tmp_path / "o"
    msg = _fail(capsys, out, model, "--max-size", "1MB", match="below the smallest mix")
    assert "bytes" in msg and "bits/weight" in msg
    _fail(capsys, out, model, "--target-bpw", "12", match="above the largest mix")
    _fail(capsys, out, model, "--max-size", "12 parsecs", match="expected a size in bytes")
    _fail(capsys, out, model, "--target-bpw", "0", match="must be a positive number")
    _fail(capsys, out, model, "--to", "onnx", "--max-size", "3MB", code=2, match="--max-size needs --to gguf")
    _fail(capsys, out, model, "--max-size", "3MB", "--pure", code=2, match="--pure")
    _fail(capsys, out, model, "--target-bpw", "6", "--quant", "F16", code=2, match="not quantized")
    with pytest.raises(SystemExit) as e:  # argparse: one budget or the other
        run_cli(model, "--max-size", "3MB", "--target-bpw", "5", "--out", out)
    assert e.value.code == 2


def test_size_units_and_bpw_budgets():
    assert parse_size("491400096", "") == 491400096
    assert parse_size("468.6MiB", "") == int(468.6 * 2**20)
    assert parse_size("0.49GB", "") == 490_000_000
    assert parse_size("2 KiB", "") == 2048
    with pytest.raises(QCompileError):
        parse_size("-3MB", "")
    b = parse_budget(None, 4.9, 1000)
    assert b.bytes == 612 and b.request == "--target-bpw 4.9"
    assert parse_budget(None, None, 1000) is None
    # hidden size 896 (Qwen2.5-0.5B): K-quants fall back as llama.cpp does
    assert candidate_types(896) == [T.Q5_0, T.Q5_1, T.Q8_0]
    assert candidate_types(4864) == [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0]


def test_a_3bit_base_offers_its_low_types_to_every_tensor(tiny_models, calib_file, tmp_path):
    """A budget over a Q3_K_M base: every tunable tensor may take Q3_K (not only those the preset put
    there), so a budget at the preset's own size is met, with Q3_K in the mix."""
    model = tiny_models["qwen3"]
    assert run_cli(model, "--quant", "Q3_K_M", "--method", "rtn", "--out", tmp_path / "p", "-q", "--no-verify") == 0
    preset = next((tmp_path / "p").glob("*.gguf")).stat().st_size
    assert run_cli(model, "--quant", "Q3_K_M", "--max-size", preset, *calib_args(calib_file), "--method", "rtn",
                   "--out", tmp_path / "b", "-q", "--no-verify") == 0
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    alloc = rep["allocation"]
    assert alloc["bytes"] <= preset and alloc["smallest_bytes"] < preset
    assert all("Q3_K" in t["options"] for t in alloc["tensors"].values())
    assert "Q3_K" in {t["type"] for t in alloc["tensors"].values()}
