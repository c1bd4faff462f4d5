"""The OpenVINO IR exporter: stateful graphs OpenVINO runs, carrying exactly our quantized integers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_onnx import _hf, _quantize

from qcompile.model import read_config
from quantizers.grids import IntType

ov = pytest.importorskip("openvino")
from exporters import openvino as xo  # noqa: E402


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _weight_constants(folder):
    """{name of the Constant at the root of a MatMul's weight input: that Constant} (walking up through
    Convert/Subtract/Multiply/Reshape)."""
    model = ov.Core().read_model(str(folder / xo.XML_FILE))
    out = {}
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        node = op.input(1).get_source_output().get_node()
        while node.get_type_name() != "Constant" and node.get_input_size():
            node = node.input(0).get_source_output().get_node()
        if node.get_type_name() == "Constant":
            out[node.get_friendly_name()] = node
    return out


@pytest.mark.parametrize("t,bound", [(None, 1e-4), (IntType(4, 128), 2e-3), (IntType(4, 32, sym=True), 2e-3),
                                     (IntType(8, 64), 2e-3), (IntType(4, 0), 2e-3), (IntType(8, 0, sym=True), 2e-3)],
                         ids=["fp", "int4", "int4-g32-sym", "int8-g64", "int4-pc", "int8-pc-sym"])
def test_logits_and_generation_match_pytorch(tiny_model, tmp_path, t, bound):
    """fp IR vs transformers <= 1e-4; quantized IR vs the dequantized PyTorch model <= 2e-3 (f32 inference,
    no dynamic activation quantization); 32 greedy tokens through the stateful KV cache equal PyTorch's."""
    cfg, tensors = _quantize(tiny_model, t) if t else (read_config(tiny_model), {})
    xo.write_openvino(tmp_path, tiny_model, cfg, tensors)
    run = xo.Runner(tmp_path)
    ids = np.random.default_rng(0).integers(0, 700, 24)
    hf = _hf(tiny_model, tensors)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids[None])).logits[0].numpy()
        gen = hf.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 3:]
    assert _rel(run.logits(ids), want) <= bound
    assert run.generate([5, 6, 7], 32, set()) == gen.tolist()
    assert run.logits(ids[:5]).shape == (5, cfg.vocab_size)  # the state resets between sequences
    np.testing.assert_allclose(run.logits(ids)[:5], run.logits(ids[:5]), rtol=1e-4, atol=1e-4)


def _constants(folder) -> dict:
    """{friendly name: Constant} of every constant in the IR."""
    model = ov.Core().read_model(str(folder / xo.XML_FILE))
    return {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}


@pytest.mark.parametrize("t", [IntType(4, 128), IntType(4, 64, sym=True), IntType(8, 128), IntType(8, 32, sym=True),
                               IntType(4, 0), IntType(8, 0, sym=True)], ids=lambda t: t.name)
def test_weights_are_stored_as_our_integers(tiny_models, tmp_path, t):
    """Every decoder linear's weight is a u4/u8 (i4/i8 symmetric) constant holding our codes: [N, K/g, g]
    grouped, [N, K] per-channel with [N, 1] float16 scales and u4/u8 zero points (NNCF's layout); the
    bytes in the .bin for them are bits/8 per weight (+ scales, zero points)."""
    model = tiny_models["qwen2"]
    cfg, tensors = _quantize(model, t)
    xo.write_openvino(tmp_path, model, cfg, tensors)
    consts = _weight_constants(tmp_path)
    linears = {n: c for n, c in consts.items() if ".layers." in n and n.endswith(".weight/codes")}
    assert len(linears) == 7 * cfg.num_layers
    want_type = {(4, False): ov.Type.u4, (8, False): ov.Type.u8, (4, True): ov.Type.i4, (8, True): ov.Type.i8}
    side = _constants(tmp_path)
    for name, c in linears.items():
        n, k = tensors[name.removesuffix("/codes")].shape
        blocks = [n, 1] if t.per_channel else [n, k // t.group, 1]
        assert c.get_element_type() == want_type[t.bits, t.sym], name
        assert list(c.get_output_shape(0)) == ([n, k] if t.per_channel else [n, k // t.group, t.group]), name
        scales = side[name.replace("/codes", "/scales")]
        assert scales.get_element_type() == ov.Type.f16 and list(scales.get_output_shape(0)) == blocks
        zp = side.get(name.replace("/codes", "/zero_points"))
        assert (zp is None) == t.sym  # symmetric: signed codes, no zero point
        if zp is not None:
            assert zp.get_element_type() == want_type[t.bits, False] and list(zp.get_output_shape(0)) == blocks
    # the codes are ours: the first q_proj's constant unpacks to the quantizer's codes (minus the fixed
    # zero point when symmetric: signed storage), its scales and zero points are the quantizer's
    name = "model.layers.0.self_attn.q_proj.weight"
    q, c = tensors[name], linears[f"{name}/codes"]
    n, k = q.shape
    raw = np.frombuffer(c.get_data().tobytes(), np.uint8)
    codes = np.stack([raw & 15, raw >> 4], -1).reshape(-1) if t.bits == 4 else raw
    blocks = q.data.reshape(n, k // t.group_for(k), -1)[:, :, 3:].reshape(-1)
    want = np.stack([blocks & 15, blocks >> 4], -1).reshape(-1) if t.bits == 4 else blocks
    if t.sym:
        want = (want.astype(np.int16) - t.zero) & ((1 << t.bits) - 1)   # two's complement in `bits` bits
    np.testing.assert_array_equal(codes, want)
    f = q.fields()
    np.testing.assert_array_equal(side[f"{name}/scales"].get_data().reshape(-1), f.params["d"].reshape(-1))
    if not t.sym:
        raw = np.frombuffer(side[f"{name}/zero_points"].get_data().tobytes(), np.uint8)
        zp = np.stack([raw & 15, raw >> 4], -1).reshape(-1)[:f.params["z"].size] if t.bits == 4 else raw
        np.testing.assert_array_equal(zp, f.params["z"].reshape(-1))
    n_lin = sum(int(np.prod(q.shape)) for q in tensors.values())
    lin_bytes = sum(int(np.prod(c.get_output_shape(0))) * t.bits // 8 for c in linears.values())
    assert lin_bytes == n_lin * t.bits // 8
    assert (tmp_path / xo.BIN_FILE).stat().st_size < 4 * n_lin  # far below the float32 size of the linears


def test_compile_cli_verifies_reports_evals_and_runs(tiny_models, tmp_path, capsys):
    """``qcompile MODEL --to openvino --bits 4``: IR folder + report with the runtime check; ``qcompile eval
    --artifact DIR`` scores it in OpenVINO; ``qcompile run DIR`` generates what PyTorch generates."""
    model, out = tiny_models["qwen2.5"], tmp_path / "ov"
    assert run_cli(model, "--to", "openvino", "--bits", "4", "--method", "rtn", "--out", out, "-q") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["target"]["format"] == "openvino" and rep["target"]["scheme"] == "INT4_G128"
    assert rep["metrics"]["artifact"]["runtime"] == "openvino"
    assert rep["metrics"]["artifact"]["rel_error"] <= 2e-3 and rep["metrics"]["artifact"]["top1"] == 1.0
    assert {f["path"] for f in rep["artifact"]["files"]} >= {"openvino_model.xml", "openvino_model.bin",
                                                             "config.json", "tokenizer.json"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    js = tmp_path / "e.json"
    assert run_cli("eval", model, "--artifact", out, "--text", text, "--ctx", "64", "--json", js, "-q") == 0
    ev = json.loads(js.read_text())["results"]["openvino"]
    assert 0 <= ev["kld_mean"] < 0.5 and ev["tokens"] > 100
    assert run_cli("eval", model, "--artifact", out, "--text", text, "--runtime", "onnxruntime", "-q") == 1
    capsys.readouterr()
    assert run_cli("run", out, "the cat", "--max-tokens", "6", "--raw") == 0
    assert capsys.readouterr().out.strip()
    # existing output without --force: refused, nothing touched
    before = (out / "openvino_model.bin").stat().st_mtime_ns
    assert run_cli(model, "--to", "openvino", "--bits", "4", "--out", out, "-q") == 1
    assert (out / "openvino_model.bin").stat().st_mtime_ns == before


def test_cli_per_channel_gptq_verifies(tiny_models, tmp_path):
    """``--to openvino --quant INT4_PC`` with GPTQ: per-channel weights (also on rows whose length is no valid group),
    an INT8_PC head and embeddings, and the runtime check passes."""
    model, out = tiny_models["qwen2"], tmp_path / "ov"
    assert run_cli(model, "--to", "openvino", "--quant", "INT4_PC", "--method", "gptq", "--calib-samples", "4",
                   "--calib-seqlen", "64", "--out", out, "-q") == 0
    rep = json.loads((out / "report.json").read_text())
    target = rep["target"]
    assert (target["scheme"], target["group_size"], target["symmetric"]) == ("INT4_PC", 0, False)
    assert target["method"] == "gptq" and target["lm_head"] == target["embeddings"] == "INT8_PC"
    assert rep["metrics"]["artifact"]["rel_error"] <= 2e-3 and rep["metrics"]["artifact"]["top1"] == 1.0
    assert rep["metrics"]["reference"]["kld_mean"] < 0.5
    cfg = read_config(model)
    codes = {n: c for n, c in _weight_constants(out).items() if n.endswith("/codes")}
    down = codes["model.layers.0.mlp.down_proj.weight/codes"]  # K = 768: no power of two, so no valid group
    assert down.get_element_type() == ov.Type.u4
    assert list(down.get_output_shape(0)) == [cfg.hidden_size, cfg.intermediate_size]
    assert codes["lm_head.weight/codes"].get_element_type() == ov.Type.u8


_OPTIMUM_INTEL_GENERATE = """
import json, sys, torch
from optimum.intel import OVModelForCausalLM
m = OVModelForCausalLM.from_pretrained(sys.argv[1], ov_config=json.loads(sys.argv[3]))
out = m.generate(torch.tensor([json.loads(sys.argv[2])]), max_new_tokens=16, do_sample=False, pad_token_id=0)
print(json.dumps(out[0].tolist()))
"""


@pytest.fixture(scope="session")
def intel_overlay():
    """optimum-intel 2.2 pins transformers < 5.6: it runs in a child process over a pinned overlay."""
    import optimum_overlay
    try:
        return optimum_overlay.ensure("openvino")
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("name", ["qwen2", "qwen2.5", "qwen3"])
def test_optimum_intel_loads_and_generates(tiny_models, tmp_path, intel_overlay, name):
    """``OVModelForCausalLM.from_pretrained(DIR)`` loads our int4 IR and greedy-generates PyTorch's tokens."""
    import optimum_overlay as ov_env
    model = tiny_models[name]
    cfg, tensors = _quantize(model, IntType(4, 128))
    xo.write_openvino(tmp_path, model, cfg, tensors)
    prompt = [5, 6, 7]
    got = json.loads(ov_env.run(_OPTIMUM_INTEL_GENERATE, str(tmp_path), json.dumps(prompt), json.dumps(xo.PRECISE),
                                overlay=intel_overlay))
    with torch.no_grad():
        want = _hf(model, tensors).generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                            pad_token_id=0)[0].tolist()
    assert got == want


def test_openvino_genai_pipeline_generates_what_we_generate(tiny_models, tmp_path):
    """``openvino_genai.LLMPipeline(DIR)`` (C++ pipeline, openvino_tokenizer.xml from openvino-tokenizers)
    greedy-decodes the same text as our own runner over the same folder."""
    genai = pytest.importorskip("openvino_genai")
    from tokenizers import Tokenizer
    model = tiny_models["qwen2"]
    cfg, tensors = _quantize(model, IntType(4, 64))
    xo.write_openvino(tmp_path, model, cfg, tensors)
    assert (tmp_path / "openvino_tokenizer.xml").is_file() and (tmp_path / "openvino_detokenizer.xml").is_file()
    pipe = genai.LLMPipeline(str(tmp_path), "CPU", **xo.PRECISE)
    gc = genai.GenerationConfig()
    gc.max_new_tokens, gc.do_sample, gc.apply_chat_template = 16, False, False
    got = pipe.generate("the cat sat on", gc)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    ids = tok.encode("the cat sat on", add_special_tokens=False).ids
    want = tok.decode(xo.Runner(tmp_path).generate(ids, 16, set()), skip_special_tokens=True)
    assert got == want and len(want) > 4


@pytest.mark.parametrize("name,body", [("qwen2", IntType(4, 64)), ("qwen2.5", IntType(4, 64)),
                                       ("qwen2.5", IntType(4, 0))], ids=["qwen2", "qwen2.5", "qwen2.5-pc"])
def test_embeddings_are_looked_up_from_our_8bit_table(tiny_models, tmp_path, name, body):
    """``--to openvino`` stores the input embeddings 8-bit (as NNCF does): the Gather reads a u8 constant
    through the decompression pattern ([vocab, hidden/g, g] grouped; [vocab, hidden] per-channel, NNCF's own
    layout), logits equal the dequantized PyTorch model and the .bin shrinks."""
    from exporters.folder import head_type, quantize_embeddings, quantize_head
    from qcompile.model import Checkpoint
    model = tiny_models[name]
    cfg, tensors = _quantize(model, body)
    t = head_type(body)
    assert t == (IntType(8, 0) if body.per_channel else IntType(8, body.group))
    ck = Checkpoint(model, cfg)
    tensors["lm_head.weight"] = quantize_head(ck, cfg, t, None)
    xo.write_openvino(tmp_path / "f", model, cfg, dict(tensors))
    tensors["model.embed_tokens.weight"] = quantize_embeddings(ck, t, None)
    xo.write_openvino(tmp_path / "q", model, cfg, tensors)
    ids = np.random.default_rng(1).integers(0, 700, 20)
    with torch.no_grad():
        m = _hf(model, {k: v for k, v in tensors.items() if k != "lm_head.weight" or not cfg.tie_word_embeddings})
        if cfg.tie_word_embeddings:  # PyTorch ties the two; put the separately quantized head back
            m.lm_head.weight = torch.nn.Parameter(torch.from_numpy(tensors["lm_head.weight"].dequantize()))
        want = m(torch.from_numpy(ids[None])).logits[0].numpy()
    assert _rel(xo.Runner(tmp_path / "q").logits(ids), want) <= 2e-3
    gathers = [op for op in ov.Core().read_model(str(tmp_path / "q" / xo.XML_FILE)).get_ops()
               if op.get_type_name() == "Gather"]
    roots = []
    for g in gathers:
        node = g.input(0).get_source_output().get_node()
        while node.get_type_name() != "Constant" and node.get_input_size():
            node = node.input(0).get_source_output().get_node()
        roots.append(node)
    table = [cfg.vocab_size, cfg.hidden_size] if t.per_channel else [cfg.vocab_size, cfg.hidden_size // 64, 64]
    assert any(r.get_element_type() == ov.Type.u8 and list(r.get_output_shape(0)) == table for r in roots)
    saved = (tmp_path / "f" / xo.BIN_FILE).stat().st_size - (tmp_path / "q" / xo.BIN_FILE).stat().st_size
    assert saved >= cfg.vocab_size * cfg.hidden_size * (2 - 1.1)  # float16 -> 8 bits + scales
