"""``qcompile build MATRIX.toml``: a matrix of compiles, sequentially and on Ray (qcompile/fleet.py).

Two tiny models x {gguf Q4_K_M, onnx INT4_G128, openvino INT4_G128}, GPTQ on one calibration file: the build on
an embedded Ray with 2 workers (one compile process killed mid-entry by the test) gives the same bytes as the
sequential build, a second build skips every entry, a two-raylet cluster runs the entries on both raylets.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import run_cli

from qcompile import fleet, tiny

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'qcompile[fleet]')")

MATRIX = """\
[options]
calib = "calib.txt"
calib-samples = 16
calib-seqlen = 64
verify = false

[[model]]
path = "a"

[[model]]
path = "b"

[[build]]
to = "gguf"
quant = "Q4_K_M"
method = "gptq"

[[build]]
to = ["onnx", "openvino"]
quant = "INT4_G128"
method = "gptq"
"""
IDS = [f"{m}/{k}" for m in "ab" for k in ("gguf-Q4_K_M-gptq", "onnx-INT4_G128-gptq", "openvino-INT4_G128-gptq")]
# Ray's own token authentication is for clusters across machines; these stay on this one
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fleet")
    for seed, name in enumerate("ab"):
        (root / name).mkdir()
        tiny.build_tokenizer(root / name)
        # 6 layers: the engine runs long enough for the test to kill it between two layers
        tiny.build_model(root / name, seed=seed + 3, num_hidden_layers=6)
    (root / "calib.txt").write_text(tiny.builtin_text() * 4)
    (root / "fleet.toml").write_text(MATRIX)
    return root / "fleet.toml"


def _files(out: Path) -> dict[str, bytes]:
    """Every artifact byte of a build folder (the records, which hold timings and nodes, and the hidden folders, such
    as .logs with a killed compile's log, aside)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("report.json", fleet.BUILD_JSON)
            and not any(part.startswith(".") for part in p.relative_to(out).parts)}


def _build(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qcompile", "build", *map(str, args), "-q"],
                            env={**os.environ, **RAY_ENV, **(env or {})}, stderr=subprocess.PIPE, text=True, **kw)


def _record(out: Path) -> dict[str, dict]:
    return {e["id"]: e for e in json.loads((out / fleet.BUILD_JSON).read_text())["entries"]}


@pytest.fixture(scope="module")
def sequential(matrix, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seq") / "dist"
    assert run_cli("build", matrix, "--out", out, "--no-ray", "-q") == 0
    return out


def test_the_matrix_multiplies_out(matrix):
    m = fleet.read_matrix(matrix)
    assert [e.id for e in m.entries] == IDS
    e = m.entries[1]
    assert e.model == str(matrix.parent / "a") and e.options["to"] == "onnx" and e.options["threads"] == 1
    assert e.options["calib"] == str(matrix.parent / "calib.txt") and e.options["calib_samples"] == 16


@pytest.mark.parametrize("text, message", [
    ('[options]\ncalib-smaples = 3\n[[model]]\npath = "a"\n[[build]]\nto = "gguf"\n', "unknown option 'calib-smaples'"),
    ('[[model]]\npath = "a"\n', "needs at least one [[model]]"),
    ('[[model]]\npath = "a"\n[[build]]\nto = "gguf"\n[[build]]\nto = "gguf"\n', "two entries are both named"),
    ('[[model]]\npath = "a"\n[[build]]\nto = "gguf"\nout = "x"\n', "unknown option 'out'"),
    ('[[model]\n', "not valid TOML"),
])
def test_a_bad_matrix_fails_in_one_line(tmp_path, capsys, text, message):
    (tmp_path / "m.toml").write_text(text)
    assert run_cli("build", tmp_path / "m.toml", "--out", tmp_path / "o", "-q") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_ray_build_equals_the_sequential_one_and_survives_a_killed_compile(matrix, sequential, tmp_path):
    """Embedded Ray, 2 workers: a/gguf's compile process is killed (SIGKILL) once its calibration has finished a
    layer; Ray runs the entry again, which resumes from the shared calibration folder's last finished layer. Every
    artifact equals the sequential build's byte for byte; ONNX and OpenVINO shared one calibrated run; a second
    build skips every entry."""
    out = tmp_path / "dist"
    proc = _build(matrix, "--out", out, "--workers", "2")
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and proc.poll() is None and time.monotonic() < deadline:
        for pid_file in (out / fleet.STAGING).glob("a__gguf-Q4_K_M-gptq.*/pid"):
            pid = int(pid_file.read_text() or 0)
            engine = _engine_of(pid)
            if engine is not None and (engine / "state.json").is_file():   # a layer is finished when the state names it
                os.kill(pid, signal.SIGKILL)
                victim = pid
        time.sleep(0.05)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert victim is not None, "the compile ended before the test could kill it"
    rec = _record(out)
    assert rec["a/gguf-Q4_K_M-gptq"]["attempt"] == 2
    resumed = json.loads((out / "a/gguf-Q4_K_M-gptq/build.json").read_text())["calibration"]
    assert "calibrated layers from --calib-cache" in resumed, resumed
    assert (out / ".logs" / "a__gguf-Q4_K_M-gptq.log").is_file()   # what the killed compile printed
    assert _files(out) == _files(sequential)
    assert sorted(_files(out)) == sorted(_files(sequential)) and len(_files(out)) > 20
    for m in "ab":
        assert rec[f"{m}/onnx-INT4_G128-gptq"]["shares_with"] == [f"{m}/openvino-INT4_G128-gptq"]
        assert "6 of 6 calibrated layers from --calib-cache" in rec[f"{m}/openvino-INT4_G128-gptq"]["calibration"]
    assert not (out / fleet.SHARED).exists() and not (out / fleet.STAGING).exists()
    again = _build(matrix, "--out", out, "--workers", "2")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    assert {e["status"] for e in _record(out).values()} == {"skipped"}


def _engine_of(pid: int) -> Path | None:
    """The shared calibration folder a compile process holds (its lock file is open in the process)."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return None
    for link in links:
        if "/engine-" in link and link.endswith(".lock"):
            return Path(link.removesuffix(".lock"))
    return None


def test_without_ray_the_build_runs_here(monkeypatch):
    """`pip install qcompile` without the fleet extra: no Ray to import, the entries run in this process's care."""
    monkeypatch.setitem(sys.modules, "ray", None)   # import ray raises ImportError
    assert fleet._ray(True) is None and fleet._ray(False) is None


def test_a_failed_entry_fails_the_build_in_one_line_and_keeps_the_rest(matrix, tmp_path):
    """An entry whose options cannot compile (INT4 for llama.cpp) fails alone: the others finish, exit 1, one line
    naming it; nothing partial in DIR."""
    (tmp_path / "m.toml").write_text(f'[[model]]\npath = "{matrix.parent / "a"}"\n[[build]]\nto = "gguf"\n'
                                     'quant = ["Q8_0", "INT4_G128"]\nverify = false\n')
    r = subprocess.run([sys.executable, "-m", "qcompile", "build", tmp_path / "m.toml", "--out", tmp_path / "o",
                        "--no-ray", "-q"], capture_output=True, text=True, env={**os.environ, **RAY_ENV})
    assert r.returncode == 1
    err = [x for x in r.stderr.splitlines() if x.startswith("qcompile build: error:")]
    assert len(err) == 1 and "a/gguf-INT4_G128-auto" in err[0], r.stderr
    assert (tmp_path / "o/a/gguf-Q8_0-auto/report.json").is_file()
    assert not (tmp_path / "o/a/gguf-INT4_G128-auto").exists()


@pytest.fixture(scope="module")
def verified(matrix, tmp_path_factory) -> Path:
    """A verified 2-entry build (GGUF Q8_0, ONNX INT8_G128 of model b), for the gate and the rendered report."""
    root = tmp_path_factory.mktemp("verified")
    (root / "v.toml").write_text(f'[options]\neval-tokens = 64\neval-ctx = 32\n[[model]]\n'
                                 f'path = "{matrix.parent / "b"}"\n[[build]]\nto = "gguf"\nquant = "Q8_0"\n'
                                 '[[build]]\nto = "onnx"\nquant = "INT8_G128"\n')
    assert run_cli("build", root / "v.toml", "--out", root / "dist", "--no-ray", "-q") == 0
    return root / "dist"


def test_report_and_check_take_the_build_folder(sequential, verified, tmp_path, capsys):
    """`qcompile report DIR` tabulates every entry, with a pair of plots per format; `qcompile check DIR --baseline
    BASE_DIR` gates each entry against the entry of the same id, a missing counterpart fails."""
    assert run_cli("report", sequential, "--out", tmp_path / "r") == 0
    table = (tmp_path / "r/report.md").read_text()
    assert all(f"| {i} |" in table for i in IDS)
    assert (tmp_path / "r/report.html").read_text().count("<figure>") == 6   # gguf, onnx, openvino
    capsys.readouterr()
    assert run_cli("check", verified, "--baseline", verified) == 0
    out = capsys.readouterr().out
    assert all(f"ok: {i}: mean KLD" in out for i in ("b/gguf-Q8_0-auto", "b/onnx-INT8_G128-auto"))
    partial = tmp_path / "partial"
    shutil.copytree(verified, partial)
    shutil.rmtree(partial / "b/onnx-INT8_G128-auto")
    assert run_cli("check", verified, "--baseline", partial) == 1
    assert "b/onnx-INT8_G128-auto: no counterpart" in capsys.readouterr().err


def test_build_report_renders_in_headless_chromium(verified, tmp_path):
    """The matrix's report.html in a real browser: the table and a quality plot per format drew (matplotlib's
    colours below the table)."""
    from test_report_command import _chromium, screenshot
    if _chromium() is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    import numpy as np
    assert run_cli("report", verified, "--out", tmp_path / "r") == 0
    img = screenshot(tmp_path / "r/report.html", tmp_path, 3000)
    colour = (img.max(-1) - img.min(-1)) > 80
    rows = np.nonzero(colour.any(1))[0]
    assert colour.sum() > 2000 and rows.max() - rows.min() > 1000, (colour.sum(), rows.min(), rows.max())


def test_two_raylets_share_the_matrix(matrix, sequential, tmp_path):
    """A cluster of two raylets on this machine (`ray start --head`, `ray start --address`, loopback, one CPU
    each): `--ray-address` runs the matrix on both, with the sequential build's bytes."""
    ray_cli = Path(sys.executable).with_name("ray")
    env = {**os.environ, **RAY_ENV}
    port = "6391"
    temp = Path(tempfile.mkdtemp(prefix="qray", dir="/tmp"))   # Ray's unix sockets live there: 107 bytes at most
    head = [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    second = [ray_cli, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
              "--disable-usage-stats"]
    try:
        for cmd in (head, second):
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
            assert r.returncode == 0, r.stderr[-2000:]
        out = tmp_path / "dist"
        proc = _build(matrix, "--out", out, "--ray-address", f"127.0.0.1:{port}")
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        nodes = {e["node"] for e in _record(out).values()}
        assert len(nodes) == 2 and None not in nodes, nodes
        assert _files(out) == _files(sequential)
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
