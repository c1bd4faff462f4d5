"""The judge: GGUFs we write, loaded and run by real llama.cpp (llama-cpp-python, in a child process)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_TOKENIZER, hf_logits, rel_error, requires_llama, run_cli
from gguf import GGUFReader
from gguf import LlamaFileType as F

from qcompile import llama_worker, tiny

pytestmark = requires_llama()


def _tokens(n: int = 64, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 760, n).tolist()


def _compile(model, out, quant) -> "Path":
    assert run_cli(model, "--quant", quant, "--out", out, "-q", "--no-verify") == 0
    return next(out.glob(f"*-{quant}.gguf"))


@pytest.fixture(scope="module")
def reference(tiny_models):
    return {name: hf_logits(d, _tokens()) for name, d in tiny_models.items()}


@pytest.mark.parametrize("quant,bound", [("F32", 1e-3), ("F16", 1e-3), ("Q8_0", 3e-2)])
def test_logits_match_transformers(tiny_models, reference, tmp_path, quant, bound):
    for name, d in tiny_models.items():
        gguf = _compile(d, tmp_path / name, quant)
        err = rel_error(llama_worker.logits(gguf, _tokens()), reference[name])
        assert err <= bound, f"{name} {quant}: rel error {err:.2e} > {bound}"


def test_q4_k_m_matches_llama_quantize(tiny_models, reference, tmp_path):
    """Our Q4_K_M vs llama.cpp's own quantizer applied to our F16 GGUF: same tensor types, error <= 1.1x."""
    for name, d in tiny_models.items():
        ours = _compile(d, tmp_path / name, "Q4_K_M")
        f16 = _compile(d, tmp_path / name, "F16")
        theirs = tmp_path / name / "llama-quantize-Q4_K_M.gguf"
        llama_worker.quantize(f16, theirs, F.MOSTLY_Q4_K_M)
        type_of = lambda p: {t.name: t.tensor_type.name for t in GGUFReader(p).tensors}
        assert type_of(ours) == type_of(theirs)
        e_ours = rel_error(llama_worker.logits(ours, _tokens()), reference[name])
        e_theirs = rel_error(llama_worker.logits(theirs, _tokens()), reference[name])
        assert e_ours <= 1.1 * e_theirs, f"{name}: ours {e_ours:.4f} vs llama-quantize {e_theirs:.4f}"


def test_mix_matches_llama_quantize_on_896_hidden(tmp_path):
    """Rows not divisible by 256 (hidden 896, as Qwen2.5-0.5B): llama.cpp's fallbacks, tensor by tensor."""
    d = tmp_path / "m"
    d.mkdir()
    tiny.build_tokenizer(d)
    tiny.build_model(d, hidden_size=896, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=14,
                     num_key_value_heads=2, tie_word_embeddings=True)
    for quant, ftype in [("Q4_K_M", F.MOSTLY_Q4_K_M), ("Q5_K_M", F.MOSTLY_Q5_K_M), ("Q4_K_S", F.MOSTLY_Q4_K_S),
                         ("IQ4_XS", F.MOSTLY_IQ4_XS), ("Q4_0", F.MOSTLY_Q4_0), ("Q6_K", F.MOSTLY_Q6_K),
                         ("Q3_K_M", F.MOSTLY_Q3_K_M), ("Q2_K", F.MOSTLY_Q2_K)]:
        ours = _compile(d, tmp_path / quant, quant)
        f16 = _compile(d, tmp_path / quant, "F16")
        theirs = tmp_path / quant / "theirs.gguf"
        llama_worker.quantize(f16, theirs, ftype)
        a = {t.name: t.tensor_type.name for t in GGUFReader(ours).tensors}
        b = {t.name: t.tensor_type.name for t in GGUFReader(theirs).tensors}
        assert a == b, quant
        assert ours.stat().st_size == pytest.approx(theirs.stat().st_size, rel=0.01)


@pytest.mark.parametrize("quant,bound", [("F32", 1e-5), ("F16", 1e-3), ("Q4_K_M", 3e-2)])
def test_verify_reports_llama_cpp_agreement(tiny_models, tmp_path, quant, bound):
    """llama.cpp vs the dequantized PyTorch model: the same weights, so the only difference is
    arithmetic (llama.cpp rounds activations to f16 for F16 weights and to 8 bits for block types)."""
    assert run_cli(tiny_models["qwen2.5"], "--quant", quant, "--out", tmp_path, "-q") == 0
    art = json.loads((tmp_path / "report.json").read_text())["metrics"]["artifact"]
    assert art["runtime"] == "llama.cpp" and art["rel_error"] < bound and art["top1"] >= 0.95, art


STRINGS = [
    "Hello, world! It's a test of the tokenizer's handling of contractions we'll see.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tindent\ttabs  and   spaces",
    "Les élèves étudient l'histoire. Straße, Größe. Привет, мир! 你好，世界。こんにちは世界。안녕하세요",
    "مرحبا بالعالم 🙂🚀 emoji + numbers 1234567890 3.14159 1e-9",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWrite SQL: SELECT * FROM t;<|im_end|>\n"
    "<|im_start|>assistant\n<tool_call>{\"name\": \"f\"}</tool_call><|im_end|>",
    "   leading spaces\n\n\nand blank lines\r\nwindows newlines",
]


@pytest.mark.skipif(not (REAL_TOKENIZER / "tokenizer.json").is_file(), reason="../shared/assets/qwen2.5-tokenizer absent")
def test_tokenization_equals_hf_with_real_qwen_tokenizer(tmp_path):
    import shutil

    from tokenizers import Tokenizer
    d = tmp_path / "real-tok"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REAL_TOKENIZER / f, d / f)
    tiny.build_model(d, vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
    gguf = _compile(d, tmp_path / "o", "F16")
    hf = Tokenizer.from_file(str(d / "tokenizer.json"))
    expected = [hf.encode(s, add_special_tokens=False).ids for s in STRINGS]
    assert llama_worker.tokenize(gguf, STRINGS) == expected
    meta = GGUFReader(gguf)
    field = lambda k: meta.fields[k].contents()
    assert field("tokenizer.ggml.pre") == "qwen2" and field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.ggml.eos_token_id") == 151645
    assert "<|im_start|>" in field("tokenizer.chat_template")
    assert len(field("tokenizer.ggml.tokens")) == 151936


def test_yarn_rope_scaling_metadata(tmp_path):
    d = tmp_path / "yarn"
    d.mkdir()
    tiny.build_tokenizer(d)
    tiny.build_model(d, num_hidden_layers=2, rope_scaling={"type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 1024})
    gguf = _compile(d, tmp_path / "o", "F32")
    f = GGUFReader(gguf).fields
    assert f["qwen2.rope.scaling.type"].contents() == "yarn"
    assert f["qwen2.rope.scaling.factor"].contents() == 4.0
    assert f["qwen2.rope.scaling.original_context_length"].contents() == 1024
    err = rel_error(llama_worker.logits(gguf, _tokens()), hf_logits(d, _tokens()))
    assert err < 1e-3, err


def test_eval_command_pytorch_and_llama_cpp_paths_agree(tiny_models, tmp_path, capsys):
    """`qcompile eval` scores a GGUF on both paths; the runtime's own arithmetic adds little on Q8_0, and
    the numbers it prints are the ones it writes to --json."""
    model = tiny_models["qwen2.5"]
    gguf_path = _compile(model, tmp_path, "Q8_0")
    text = tmp_path / "eval.txt"
    text.write_text(tiny.builtin_text())
    assert run_cli("eval", model, "--artifact", gguf_path, "--text", text, "--ctx", "64", "--stride", "32",
                   "--max-tokens", "300", "--json", tmp_path / "e.json", "-q") == 0
    out = json.loads((tmp_path / "e.json").read_text())
    pt, lc = out["results"]["pytorch"], out["results"]["llama.cpp"]
    assert out["stride"] == 32 and pt["tokens"] == lc["tokens"] == 299
    assert pt["kld_mean"] < 0.01 and lc["kld_mean"] < 0.01
    assert abs(pt["ppl_quant"] - lc["ppl_quant"]) / pt["ppl_quant"] < 0.01 and lc["top1"] > 0.9
    assert f"{lc['kld_mean']:.5f}" in capsys.readouterr().out
    # both paths score against one PyTorch reference (ppl_fp is shared, so equal by construction): what shows
    # that the llama.cpp path reads the artifact is an F32 file, whose runtime PPL is the reference's own
    f32 = _compile(model, tmp_path / "f32", "F32")
    assert run_cli("eval", model, "--artifact", f32, "--text", text, "--ctx", "64", "--stride", "32",
                   "--max-tokens", "300", "--json", tmp_path / "f.json", "-q") == 0
    exact = json.loads((tmp_path / "f.json").read_text())["results"]["llama.cpp"]
    assert exact["ppl_quant"] == pytest.approx(exact["ppl_fp"], rel=1e-3) and exact["kld_mean"] < 1e-4
    assert lc["kld_mean"] > 10 * exact["kld_mean"]  # and the Q8_0 file's own rounding shows
    # bad input: one line, exit 1
    assert run_cli("eval", model, "--artifact", tmp_path / "missing.gguf", "--text", text) == 1
    assert run_cli("eval", model, "--text", tmp_path / "missing.txt") == 1


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa4", "gqa2"])
def test_low_bit_mixes_match_llama_quantize(tmp_path, kv_heads):
    """The 3- and 2-bit mixes on rows that take 256-blocks (hidden 512, 16 layers: the n/16 and n/8 layer
    rules fire; grouped-query ratio 4 and 2: Q2_K's attn_v rule differs): our tensor types are
    llama-quantize's on our F16, tensor by tensor, and the files are the same size. (IQ3_XXS needs an
    imatrix, which llama_model_quantize's C API cannot be handed from Python: see the IQ3_XXS test below.)"""
    d = tmp_path / "m"
    d.mkdir()
    tiny.build_tokenizer(d)
    tiny.build_model(d, hidden_size=512, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=8,
                     num_key_value_heads=kv_heads, tie_word_embeddings=False)
    f16 = _compile(d, tmp_path / "f16", "F16")
    for quant, ftype in [("Q3_K_S", F.MOSTLY_Q3_K_S), ("Q3_K_M", F.MOSTLY_Q3_K_M), ("Q3_K_L", F.MOSTLY_Q3_K_L),
                         ("Q2_K", F.MOSTLY_Q2_K)]:
        ours = _compile(d, tmp_path / quant, quant)
        theirs = tmp_path / quant / "theirs.gguf"
        llama_worker.quantize(f16, theirs, ftype)
        a = {t.name: t.tensor_type.name for t in GGUFReader(ours).tensors}
        b = {t.name: t.tensor_type.name for t in GGUFReader(theirs).tensors}
        assert a == b, (quant, {k: (a[k], b[k]) for k in a if a[k] != b.get(k)})
        assert ours.stat().st_size == theirs.stat().st_size, quant


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa4", "gqa2"])
def test_iq3_xxs_end_to_end(tmp_path, kv_heads, capsys):
    """IQ3_XXS, a codebook mix llama.cpp quantizes only with an imatrix: without --calib it self-calibrates
    (imatrix); GPTQ on a file works too; llama.cpp runs both and agrees with the dequantized model; the
    types are llama.cpp's IQ3_XXS-with-imatrix rules (attn_q/attn_k IQ2_S, attn_output IQ3_S, output Q5_K;
    attn_v Q4_K at a query/KV ratio >= 4, else IQ3_XXS); plain RTN is refused up front."""
    d = tmp_path / "m"
    d.mkdir()
    tiny.build_tokenizer(d)
    tiny.build_model(d, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=kv_heads, tie_word_embeddings=False)
    calib = tmp_path / "calib.txt"
    calib.write_text(tiny.builtin_text())
    assert run_cli(d, "--quant", "IQ3_XXS", "--method", "rtn", "--out", tmp_path / "rtn", "-q") == 2
    assert "need calibration statistics" in capsys.readouterr().err
    for label, extra in (("imatrix", ["--calib-samples", "4", "--calib-seqlen", "64"]),
                         ("gptq", ["--calib", calib, "--calib-samples", "8", "--calib-seqlen", "64"])):
        out = tmp_path / label
        assert run_cli(d, "--quant", "IQ3_XXS", *extra, "--out", out, "-q") == 0
        rep = json.loads((out / "report.json").read_text())
        assert rep["target"]["method"] == label
        assert rep["metrics"]["artifact"]["rel_error"] < 0.05  # llama.cpp vs the dequantized PyTorch model
        types = {t.name: t.tensor_type.name for t in GGUFReader(out / rep["artifact"]["path"]).tensors}
        assert types["output.weight"] == "Q5_K" and types["token_embd.weight"] == "IQ3_S"
        for i in range(4):
            assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.attn_k.weight"] == "IQ2_S"
            assert types[f"blk.{i}.attn_output.weight"] == "IQ3_S"
            assert types[f"blk.{i}.attn_v.weight"] == ("Q4_K" if 8 // kv_heads >= 4 else "IQ3_XXS")
            assert types[f"blk.{i}.ffn_down.weight"] == types[f"blk.{i}.ffn_up.weight"] == "IQ3_XXS"
