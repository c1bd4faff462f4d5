"""The memory bound: the calibrated stages hold about one decoder layer, whatever the layer count.

Two checkpoints of the same width, 2 and 12 layers (a "tiny but wide-enough" model: 45 M parameters,
180 MB in float32). Each path runs as a real ``qcompile`` process while its process tree's anonymous
memory is sampled (:mod:`qcompile.memwatch`). Streaming means the 24-layer run peaks where the 2-layer
run does; a path that materialised the model in float32 (the old self-calibration through transformers'
``generate``, the old whole-graph Fisher of ``--max-size``) would need at least the 10 extra layers'
150 MB more. The bound allowed, 45 MB, is under a third of that, so the test cannot pass by accident.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest
from conftest import requires_llama

from qcompile import memwatch, tiny

WIDE = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2,
            tie_word_embeddings=True)
LAYERS = (2, 12)
PER_LAYER_F32_MB = 4 * (2 * 512 * 512 + 2 * 128 * 512 + 3 * 512 * 2048 + 512 * 4 + 2 * 128) / 2**20
GROWTH_MB = 45


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory) -> dict[int, object]:
    out = {}
    for n in LAYERS:
        d = tmp_path_factory.mktemp(f"wide{n}")
        tiny.build_tokenizer(d)
        tiny.build_model(d, seed=5, num_hidden_layers=n, **WIDE)
        out[n] = d
    return out


@pytest.mark.parametrize("kernel_says", [True, False], ids=["kcmp", "figures"])
def test_a_vfork_child_is_its_parents_memory(monkeypatch, kernel_says):
    """A child between vfork and exec runs in its parent's address space: the tree counts it once; a real
    child (its own figures, even equal to a sibling's) is added. Asked of the kernel (kcmp), or, where it
    cannot say, read off the figures with the tolerance the parent's moving threads need."""
    mem = {1: (200_000, 5_000), 2: (200_700, 4_990), 3: (30_000, 1_000), 4: (30_000, 1_000)}
    kids = {1: [2, 3], 3: [4], 2: [], 4: []}
    one_mm = {(1, 2), (3, 4)}
    monkeypatch.setattr(memwatch, "_rss_kb", lambda p: mem[p])
    monkeypatch.setattr(memwatch, "_children", lambda p: kids[p])
    monkeypatch.setattr(memwatch, "_shares_memory", lambda a, b: (a, b) in one_mm if kernel_says else None)
    # 2 is 1 mid-vfork (counted once); 3 is a program of its own; 4 is 3 mid-vfork
    assert memwatch.tree_rss_kb(1) == (230_000, 6_000)  # (2's file pages move as it execs: anon decides)
    mem[2] = (12_000, 3_000)  # after exec: its own memory
    one_mm.discard((1, 2))
    assert memwatch.tree_rss_kb(1) == (242_000, 9_000)


def test_the_kernel_tells_a_vfork_child_from_a_forked_one():
    """kcmp on real processes: a forked child has an address space of its own (its pages are copy-on-write,
    already split by the proportional figures); this process shares its own."""
    if memwatch._shares_memory(os.getpid(), os.getpid()) is None:
        pytest.skip("the kernel does not answer kcmp here (the figures' rule is used)")
    child = os.fork()
    if child == 0:
        time.sleep(5)
        os._exit(0)
    try:
        assert memwatch._shares_memory(os.getpid(), child) is False
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


@pytest.mark.parametrize("kernel_says", [True, False], ids=["kcmp", "figures"])
def test_a_process_spawning_programs_is_not_counted_twice(tmp_path, monkeypatch, kernel_says):
    """The real thing: a process holding 200 MB that starts `true` over and over. Sampled without the rule
    above, its tree peaked at twice its memory (627 MB for a 310 MB process, caught in every run; with an
    exact-figures rule still 426 MB for 213 once in CI)."""
    if not kernel_says:
        monkeypatch.setattr(memwatch, "_shares_memory", lambda a, b: None)
    elif memwatch._shares_memory(os.getpid(), os.getpid()) is None:
        pytest.skip("the kernel does not answer kcmp here")
    script = tmp_path / "spawn.py"
    script.write_text("import numpy as np, subprocess\na = np.ones(200 * 2**20 // 8)\n"
                      "for _ in range(600):\n    subprocess.run(['true'])\n")
    r = memwatch.run([sys.executable, script], every=0.0)
    assert r.returncode == 0 and 200 < r.anon_mb < 260


def _peak(model, out, *args) -> memwatch.Peak:
    r = memwatch.run([sys.executable, "-m", "qcompile", model, "--out", out, "--no-verify", "-q", "--threads", "2",
                      *args], log=out.parent / f"{out.name}.log")
    assert r.returncode == 0, (out.parent / f"{out.name}.log").read_text()[-2000:]
    return r


def _check(peaks: dict[int, memwatch.Peak]) -> None:
    whole_f32_growth = (LAYERS[1] - LAYERS[0]) * PER_LAYER_F32_MB
    assert whole_f32_growth > 3 * GROWTH_MB  # the test's premise: a whole-model f32 path could not hide
    growth = peaks[LAYERS[1]].anon_mb - peaks[LAYERS[0]].anon_mb
    print({n: round(p.anon_mb) for n, p in peaks.items()}, f"growth {growth:.0f} MB, f32 model growth "
          f"{whole_f32_growth:.0f} MB")
    assert growth < GROWTH_MB


@requires_llama()
def test_default_bits4_holds_one_layer(wide_models, tmp_path):
    """``--bits 4`` without --calib: self-calibration (Q8_0 copy + llama.cpp sampling) and the imatrix."""
    peaks = {n: _peak(m, tmp_path / f"d{n}", "--bits", "4", "--calib-samples", "4", "--calib-seqlen", "32")
             for n, m in wide_models.items()}
    rep = json.loads((tmp_path / f"d{LAYERS[1]}" / "report.json").read_text())
    assert rep["target"]["method"] == "imatrix" and rep["calibration"].startswith("self-generated")
    _check(peaks)


def test_max_size_holds_one_layer(wide_models, tmp_path):
    """``--max-size``: the Fisher sensitivity analysis, layer by layer."""
    calib = tmp_path / "calib.txt"
    calib.write_text(tiny.builtin_text())
    peaks = {}
    for n, m in wide_models.items():
        base = _peak(m, tmp_path / f"q{n}", "--quant", "Q4_K_M", "--method", "rtn")
        size = json.loads((tmp_path / f"q{n}" / "report.json").read_text())["artifact"]["bytes"]
        peaks[n] = _peak(m, tmp_path / f"m{n}", "--quant", "Q4_K_M", "--method", "rtn", "--max-size",
                         str(int(size * 1.05)), "--calib", calib, "--calib-samples", "4", "--calib-seqlen", "32")
        assert "allocation" in json.loads((tmp_path / f"m{n}" / "report.json").read_text())
        assert base.anon_mb < peaks[n].anon_mb  # the analysis ran (and cost something)
    _check(peaks)


def test_gptq_holds_one_layer(wide_models, tmp_path):
    """GPTQ with a calibration file: Hessians, the sweep and the layer engine's activations."""
    calib = tmp_path / "calib.txt"
    calib.write_text(tiny.builtin_text())
    _check({n: _peak(m, tmp_path / f"g{n}", "--bits", "4", "--calib", calib, "--calib-samples", "4",
                     "--calib-seqlen", "32") for n, m in wide_models.items()})


def _at_the_version_floor() -> bool:
    import transformers
    return tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 1)


@pytest.mark.parametrize("to", ["onnx"])
@pytest.mark.xfail(_at_the_version_floor(), strict=False,
                   reason="at the lowest versions (.ci/lowest.txt) the ONNX export grew 59-79 MB for 10 extra "
                          "layers in CI's fresh venv and 28 MB in another venv with the same packages; not "
                          "understood yet (no child process; not gc): measured, not hidden")
def test_folder_export_holds_one_layer(wide_models, tmp_path, to):
    """ONNX: the quantized linears wait on disk, memory-mapped, until the graph is written, so the export
    does not hold the quantized model. 8-bit: the 10 extra layers' codes are then ~110 MB, which an export
    holding them could not hide under the bound (before the spill it grew 57 MB at 8 bits vs 27 MB after).
    OpenVINO is not here: its codes are shared from the spill too, but the PyTorch-frontend conversion of
    the traced float graph still grows with the layer count (228 MB for the 10 extra layers), not fixed yet."""
    pytest.importorskip(to)
    _check({n: _peak(m, tmp_path / f"{to}{n}", "--to", to, "--bits", "8", "--method", "rtn")
            for n, m in wide_models.items()})
