"""Every bad input is one line on stderr, a non-zero exit, and no file left behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _fail(capsys, out: Path, *args, code: int = 1, match: str = "") -> str:
    rc = run_cli(*args, "--out", out, "-q")
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompile: error:"), err
    assert match in lines[0], lines[0]
    assert not [f for f in _files(out) if f.endswith((".gguf", ".tmp", ".json"))], _files(out)
    return lines[0]


@pytest.fixture
def copy_model(tiny_models, tmp_path):
    def make(name: str = "qwen2.5") -> Path:
        d = tmp_path / f"copy-{name}"
        shutil.copytree(tiny_models[name], d)
        return d
    return make


def test_missing_path(capsys, tmp_path):
    _fail(capsys, tmp_path / "o", tmp_path / "nope", match="not found")


def test_dir_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _fail(capsys, tmp_path / "o", tmp_path / "empty", match="no config.json")


def test_unsupported_architecture(capsys, copy_model, tmp_path):
    d = copy_model()
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _fail(capsys, tmp_path / "o", d, match="unsupported architecture 'LlamaForCausalLM'")
    assert "Qwen2ForCausalLM" in msg and "Qwen3ForCausalLM" in msg


def test_truncated_shard(capsys, copy_model, tmp_path):
    d = copy_model()
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    _fail(capsys, tmp_path / "o", d, match="truncated")


def test_corrupt_header(capsys, copy_model, tmp_path):
    d = copy_model()
    st = d / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[8:40] = b"#" * 32
    st.write_bytes(bytes(data))
    _fail(capsys, tmp_path / "o", d, match="corrupt safetensors")


def test_index_names_missing_shard(capsys, copy_model, tmp_path):
    d = copy_model()
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    _fail(capsys, tmp_path / "o", d, match="model-00002-of-00002.safetensors")


def test_nan_in_weight_names_tensor(capsys, copy_model, tmp_path):
    import safetensors.torch
    d = copy_model()
    tensors = safetensors.torch.load_file(d / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    safetensors.torch.save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    _fail(capsys, tmp_path / "o", d, match="model.layers.1.mlp.up_proj.weight")


def test_missing_tokenizer(capsys, copy_model, tmp_path):
    d = copy_model()
    (d / "tokenizer.json").unlink()
    _fail(capsys, tmp_path / "o", d, match="tokenizer.json")


def test_output_exists_without_force(capsys, tiny_models, tmp_path):
    out = tmp_path / "o"
    assert run_cli(tiny_models["qwen2.5"], "--quant", "Q8_0", "--out", out, "-q", "--no-verify") == 0
    name = next(p for p in out.iterdir() if p.suffix == ".gguf")
    before = name.read_bytes()
    rc = run_cli(tiny_models["qwen2.5"], "--quant", "Q8_0", "--out", out, "-q", "--no-verify")
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "already exists" in err and "--force" in err and len(err.splitlines()) == 1
    assert name.read_bytes() == before
    assert run_cli(tiny_models["qwen2.5"], "--quant", "Q8_0", "--out", out, "-q", "--no-verify", "--force") == 0


def test_unwritable_output_dir(capsys, tiny_models, tmp_path):
    if os.geteuid() != 0:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
        try:
            _fail(capsys, out, tiny_models["qwen2.5"], match="not writable")
        finally:
            out.chmod(0o700)
    else:  # root ignores permission bits; a directory under /proc cannot be created by anyone
        rc = run_cli(tiny_models["qwen2.5"], "--out", "/proc/qcompile-out", "-q")
        err = capsys.readouterr().err.strip()
        assert rc == 1 and len(err.splitlines()) == 1 and "cannot create directory" in err, err


def test_output_path_is_a_file(capsys, tiny_models, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    rc = run_cli(tiny_models["qwen2.5"], "--out", f, "-q")
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "not a directory" in err and f.read_text() == "x"


def test_unknown_quant_type_is_usage_error(capsys, tiny_models, tmp_path):
    _fail(capsys, tmp_path / "o", tiny_models["qwen2.5"], "--quant", "Q3_XYZ", code=2, match="unknown quantization type")


def test_per_channel_grid_for_onnx_is_usage_error(capsys, tiny_models, tmp_path):
    """MatMulNBits takes power-of-two block sizes only, so per-channel grids are OpenVINO's alone."""
    msg = _fail(capsys, tmp_path / "o", tiny_models["qwen2.5"], "--to", "onnx", "--quant", "INT8_PC_SYM", code=2,
                match="--quant INT8_PC_SYM: per-channel grids need --to openvino")
    assert "power-of-two" in msg
    # refused before the model is even looked up (a hub id would not be downloaded for nothing)
    _fail(capsys, tmp_path / "o", tmp_path / "nope", "--to", "onnx", "--quant", "INT4_PC", code=2, match="per-channel")


def test_invalid_family_combination_lists_valid_sizes(capsys, tmp_path):
    msg = _fail(capsys, tmp_path / "o", "72B", "--family", "coder", code=2, match="did not publish")
    assert "0.5B 1.5B 3B 7B 14B 32B" in msg


def test_ctrl_c_mid_write_leaves_nothing(tiny_models, tmp_path):
    """SIGINT while the GGUF is being written: exit 1, no artifact and no temp file."""
    out = tmp_path / "o"
    env = dict(os.environ, QCOMPILE_CHUNK_BYTES="1024")  # one row per chunk: a write long enough to interrupt
    proc = subprocess.Popen([sys.executable, "-m", "qcompile", str(tiny_models["qwen2"]), "--quant", "F32",
                             "--out", str(out), "--no-verify", "-q"], env=env, stderr=subprocess.PIPE, text=True,
                            # a shell may start background jobs with SIGINT ignored; the child must see it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not any(f.endswith(".tmp") for f in _files(out)):
        time.sleep(0.02)
    assert any(f.endswith(".tmp") for f in _files(out)), "never saw the temp file"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "interrupted" in err
    assert _files(out) == []


def test_pickle_weights_need_allow_pickle(capsys, tiny_models, tmp_path):
    import torch
    from safetensors.torch import load_file
    d = tmp_path / "pickled"
    shutil.copytree(tiny_models["qwen2"], d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    _fail(capsys, tmp_path / "o", d, match="--allow-pickle")
    # with the flag: the same tensors as from safetensors
    from gguf import GGUFReader
    assert run_cli(d, "--quant", "Q4_K_M", "--out", tmp_path / "p", "-q", "--no-verify", "--allow-pickle") == 0
    assert run_cli(tiny_models["qwen2"], "--quant", "Q4_K_M", "--out", tmp_path / "s", "-q", "--no-verify") == 0
    a = GGUFReader(tmp_path / "p" / "pickled-Q4_K_M.gguf").tensors
    b = GGUFReader(tmp_path / "s" / "qwen2-Q4_K_M.gguf").tensors
    assert len(a) == len(b) and all(x.name == y.name and bytes(x.data) == bytes(y.data) for x, y in zip(a, b))


@pytest.mark.parametrize("free_mib, match", [
    (3, "the disk is full (852992 requested and 45696 written; 3 MiB free); nothing was written"),
    (10_000, "-Q8_0.gguf: 852992 requested and 45696 written; nothing was written"),
])
def test_short_write_names_the_output_and_a_full_disk(capsys, tiny_models, tmp_path, monkeypatch, free_mib, match):
    """A full disk mid-write (numpy's short write carries no errno) is one line naming the file and the cause,
    and the half-written temp file is gone."""
    from collections import namedtuple

    from exporters import gguf as gguf_exporter
    from qcompile import errors

    real = gguf_exporter._ChunkedTensor.tofile
    calls = []

    def tofile(self, f):
        calls.append(1)
        if len(calls) == 3:   # a few tensors in: header and the first tensors are on disk already
            raise OSError("852992 requested and 45696 written")
        return real(self, f)

    monkeypatch.setattr(gguf_exporter._ChunkedTensor, "tofile", tofile)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda p: usage(1 << 40, 0, free_mib << 20))
    _fail(capsys, tmp_path / "o", tiny_models["qwen2.5"], "--quant", "Q8_0", "--no-verify", match=match)


def test_oserror_without_a_filename_is_one_clean_line(capsys):
    from qcompile.errors import guarded

    def work():
        raise OSError("something broke")
    assert guarded("qcompile", work) == (1, None)
    assert capsys.readouterr().err == "qcompile: error: something broke\n"


def test_internal_error_is_reported_as_a_bug_not_as_bad_input(tiny_models, tmp_path, capsys, monkeypatch):
    """A bug inside the pipeline (here an injected KeyError, the kind that once printed ``qcompile: error:
    'artifact'`` as if the input were wrong) prints a traceback tail and "internal error", exit 1, no output."""
    from qcompile import pipeline

    def broken(*a, **kw):
        raise KeyError("artifact")
    monkeypatch.setattr(pipeline, "verify", broken)
    out = tmp_path / "out"
    rc = run_cli(tiny_models["qwen2.5"], "--to", "gguf", "--bits", "4", "--out", out, "-q")
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback (most recent call last)" in err and 'raise KeyError("artifact")' in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("qcompile: internal error: KeyError: 'artifact'") and "a bug in qcompile" in last, last
    assert "usage" not in err.lower() and not [f for f in _files(out) if f.endswith((".gguf", ".tmp"))]


@pytest.mark.parametrize("args,match", [
    (["--quant", "Q4_Z"], "unknown quantization type 'Q4_Z'"),
    (["--to", "onnx", "--quant", "INT5_G128"], "INT5_G128"),
])
def test_unknown_registry_names_are_usage_errors(tiny_models, tmp_path, capsys, args, match):
    _fail(capsys, tmp_path / "out", tiny_models["qwen2.5"], *args, code=2 if args[0] == "--quant" else 1, match=match)
