#!/usr/bin/env python3
"""OpenVINO on the CPU: our int4 IR vs optimum-intel / NNCF int4, on the real model.

Real Qwen2.5-Coder-0.5B-Instruct (../shared/tools/real_qwen.py). Rows:

* **NNCF int4 data-free** — ``optimum-cli export openvino --weight-format int4`` (group 128; NNCF's defaults
  for everything else, e.g. int8 embeddings / head);
* **NNCF int4 AWQ + scale estimation** — the same with ``awq=True, scale_estimation=True`` on our own
  calibration samples (the 128 x 512-token windows qcompile's GPTQ used, decoded back to text: optimum-intel
  takes a list of strings, no hub dataset needed);
* **qcompile int4 GPTQ** — the folder ``onnx_bench.py`` built (``qcompile --to onnx --bits 4``, INT4_G128 GPTQ,
  lm_head int8), its weights read back from the ONNX folder and written by
  ``exporters.openvino.write_openvino`` — what ``--to openvino`` writes for the same quantized tensors.

optimum-intel pins transformers < 5.6, so NNCF runs in its own virtual environment (``--nncf-python``; made on
first use in ``WORK/nncf-venv``). Speed: prompt and decode tokens/s on ``--threads`` threads with the CPU
plugin's defaults (what users run: dynamic activation quantization, u8 KV cache). Quality: mean KLD / top-1 /
perplexity against the bf16 checkpoint on held-out text (``qcompile eval --artifact DIR``: OpenVINO with f32
inference, no activation quantization, f32 KV cache, so the weights are what is measured).

    python benchmarks/openvino_bench.py [--threads 2] [--nncf-python PY]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tools import commit, folder_quality, table  # noqa: E402
from kld_bench import MODEL_NOTE, REAL, eval_text, real_model  # noqa: E402
from quality import calib_text  # noqa: E402

_NNCF_EXPORT = """
import json, sys
from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig
from transformers import AutoTokenizer
model, out, mode, calib = sys.argv[1:5]
kw = dict(bits=4, group_size=128)
if mode == "awq":
    samples = json.load(open(calib, encoding="utf-8"))
    kw.update(awq=True, scale_estimation=True, num_samples=len(samples), dataset=samples)
tok = AutoTokenizer.from_pretrained(model)
m = OVModelForCausalLM.from_pretrained(model, export=True, quantization_config=OVWeightQuantizationConfig(
    tokenizer=model, **kw) if mode == "awq" else OVWeightQuantizationConfig(**kw))
m.save_pretrained(out)
tok.save_pretrained(out)
"""


def nncf_python(arg: Path | None, work: Path) -> Path:
    """A Python with optimum-intel + NNCF (transformers 5.5): ``arg``, or a venv made in ``work``."""
    if arg:
        return arg
    venv = work / "nncf-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        # torchvision pinned to torch 2.13's release, or pip replaces the CPU torch with a CUDA one
        subprocess.run([str(py), "-m", "pip", "install", "-q", "optimum-intel[openvino,nncf]==2.2.0",
                        "transformers==5.5.4", "torch==2.13.0", "torchvision==0.28.0"], check=True)
    return py


def calib_samples(model: Path, calib: Path, out: Path, n: int = 128, seqlen: int = 512) -> Path:
    """The token windows qcompile calibrates on (same spec, count, length, seed), decoded to strings."""
    if not out.exists():
        from tokenizers import Tokenizer

        from calibration.sources import calibration_tokens
        tok = Tokenizer.from_file(str(model / "tokenizer.json"))
        windows = calibration_tokens(str(calib), model, n, seqlen, 0)
        out.write_text(json.dumps([tok.decode(w.tolist()) for w in windows]))
    return out


def nncf_folder(py: Path, model: Path, out: Path, mode: str, calib: Path) -> tuple[Path, float]:
    """NNCF's int4 export in its own environment; returns the folder and the seconds it took."""
    stamp = out / "seconds.txt"
    if not (out / "openvino_model.xml").exists():
        t0 = time.perf_counter()
        subprocess.run([str(py), "-c", _NNCF_EXPORT, str(model), str(out), mode, str(calib)], check=True)
        stamp.write_text(f"{time.perf_counter() - t0:.1f}")
    return out, float(stamp.read_text()) if stamp.exists() else float("nan")


def ours_folder(onnx_dir: Path, model: Path, out: Path) -> Path:
    """qcompile's IR with the ONNX GPTQ folder's very weights, written by ``exporters.openvino.write_openvino``
    (what ``--to openvino`` runs), with its 8-bit embeddings."""
    from exporters.folder import head_type, quantize_embeddings
    from exporters.onnx import read_matmulnbits
    from exporters.openvino import write_openvino
    from qcompile.model import Checkpoint, read_config
    from quantizers.grids import IntType
    if not (onnx_dir / "model.onnx").exists():
        raise SystemExit(f"{onnx_dir}: run benchmarks/onnx_bench.py first (it builds qcompile's int4 GPTQ folder)")
    if not (out / "openvino_model.xml").exists():
        out.mkdir(parents=True, exist_ok=True)
        cfg = read_config(model)
        tensors = read_matmulnbits(onnx_dir)  # no GPTQ re-run: the same weights
        tensors["model.embed_tokens.weight"] = quantize_embeddings(Checkpoint(model, cfg), head_type(IntType(4, 128)),
                                                                   None)
        write_openvino(out, model, cfg, tensors)
    return out


def speed(folder: Path, threads: int, prompt: int, decode: int) -> dict:
    """Load time, prefill and decode tokens/s (stateful KV cache) with the CPU plugin's default settings."""
    import openvino as ov
    t0 = time.perf_counter()
    req = ov.Core().compile_model(str(folder / "openvino_model.xml"), "CPU",
                                  {"INFERENCE_NUM_THREADS": threads}).create_infer_request()
    load = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(0, 10000, (1, prompt))

    def step(cur, start):
        n = start + cur.shape[1]
        req.infer({"input_ids": cur, "attention_mask": np.ones((1, n), np.int64),
                   "position_ids": np.arange(start, n, dtype=np.int64)[None], "beam_idx": np.zeros(1, np.int32)})
        return int(req.get_tensor("logits").data[0, -1].argmax())
    req.reset_state()
    step(ids[:, :16], 0)  # warm-up
    req.reset_state()
    t1 = time.perf_counter()
    nxt = step(ids, 0)
    prefill = prompt / (time.perf_counter() - t1)
    t2 = time.perf_counter()
    for k in range(decode):
        nxt = step(np.array([[nxt]]), prompt + k)
    return {"load_s": load, "prefill_tps": prefill, "decode_tps": decode / (time.perf_counter() - t2)}


def census(folder: Path) -> dict:
    """How the IR stores its weights: the number of u4/i4 and u8/i8 weight-code constants (zero points
    left out) and how many values they hold (acceptance: the linears really are 4-bit)."""
    import openvino as ov
    out = {"4bit": 0, "4bit_values": 0, "8bit": 0, "8bit_values": 0}
    for op in ov.Core().read_model(str(folder / "openvino_model.xml")).get_ops():
        if op.get_type_name() != "Constant":
            continue
        t, shape = op.get_element_type(), list(op.get_output_shape(0))
        key = "4bit" if t in (ov.Type.u4, ov.Type.i4) else "8bit" if t in (ov.Type.u8, ov.Type.i8) else None
        if key and len(shape) >= 2 and shape[-1] > 1:   # weight codes; zero points are [N, blocks, 1]
            out[key] += 1
            out[key + "_values"] += int(np.prod(shape))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REAL)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile-bench" / "openvino")
    ap.add_argument("--onnx-work", type=Path, default=Path.home() / ".cache" / "qcompile-bench" / "onnx",
                    help="onnx_bench.py's work folder (qcompile's int4 GPTQ folder is taken from there)")
    ap.add_argument("--nncf-python", type=Path, help="a Python with optimum-intel[openvino,nncf] (transformers<5.6)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="speed runs per model (median)")
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args()
    model = real_model(args.model)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    text, calib = eval_text(work), calib_text(work)
    py = nncf_python(args.nncf_python, work)
    samples = calib_samples(model, calib, work / "calib-samples.json")
    # folders keyed by the code that made them: NNCF's version, and the commit of onnx_bench's GPTQ folder
    nncf = subprocess.run([str(py), "-c", "import nncf; print(nncf.__version__)"], check=True, capture_output=True,
                          text=True).stdout.strip()
    latest = args.onnx_work / "qcompile-int4-latest.json"
    if not latest.exists() or json.loads(latest.read_text())["code"] != commit() or commit().endswith("+dirty"):
        raise SystemExit(f"run benchmarks/onnx_bench.py at this commit ({commit()}, clean) first: its int4 GPTQ "
                         "folder is the one converted here")
    onnx_dir = Path(json.loads(latest.read_text())["folder"])
    folders = [("NNCF int4 data-free", *nncf_folder(py, model, work / f"nncf{nncf}-int4", "data-free", samples)),
               ("NNCF int4 AWQ + scale estimation", *nncf_folder(py, model, work / f"nncf{nncf}-int4-awq", "awq",
                                                                 samples)),
               ("qcompile int4 GPTQ (lm_head int8)", ours_folder(onnx_dir, model, work / onnx_dir.name),
                float("nan"))]
    if args.build_only:
        return
    # speed: every model --repeats times, interleaved (so a slow moment hits all of them), median per metric
    runs: dict[Path, list[dict]] = {f: [] for _, f, _ in folders}
    for _ in range(args.repeats):
        for _, folder, _ in folders:
            runs[folder].append(speed(folder, args.threads, args.prompt, args.decode))
    rows = []
    for label, folder, secs in folders:
        size = (folder / "openvino_model.bin").stat().st_size
        med = {k: float(np.median([r[k] for r in runs[folder]])) for k in runs[folder][0]}
        rows.append((label, size, secs, med, folder_quality(model, folder, text, args.threads), census(folder)))
    # the checkpoint's parameter count, as our ONNX compile of it recorded it (mix_bench reads it the same way)
    n_params = json.loads((onnx_dir / "report.json").read_text())["model"]["parameters"]
    peer_tps = rows[0][3]["decode_tps"]
    best_kld = min(r[4]["kld_mean"] for r in rows[:2])
    print(f"model {model.name} ({MODEL_NOTE}); {args.threads} threads; prompt {args.prompt} tokens, decode {args.decode} tokens "
          f"(CPU plugin defaults); KLD vs the bf16 checkpoint on 6 x 512 held-out tokens (f32 inference)")
    print(f"speed: median of {args.repeats} interleaved runs; {n_params} parameters; NNCF rows: nncf {nncf} "
          f"(optimum-intel); qcompile row: commit {commit()} (weights of onnx_bench's folder {onnx_dir.name})")
    print(table(["model", ".bin bytes", "B / param", "4-bit consts (values)", "8-bit consts (values)", "export s",
                 "load s", "prefill tok/s", "decode tok/s", "decode / NNCF", "PPL", "mean KLD", "KLD / NNCF best",
                 "top-1 %"],
                [[label, f"{size}", f"{size / n_params:.3f}", f"{c['4bit']} ({c['4bit_values']})",
                  f"{c['8bit']} ({c['8bit_values']})", f"{secs:.0f}", f"{s['load_s']:.2f}", f"{s['prefill_tps']:.0f}",
                  f"{s['decode_tps']:.1f}", f"{s['decode_tps'] / peer_tps:.2f}", f"{q['ppl_quant']:.3f}",
                  f"{q['kld_mean']:.5f}", f"{q['kld_mean'] / best_kld:.2f}", f"{100 * q['top1']:.1f}"]
                 for label, size, secs, s, q, c in rows]))


if __name__ == "__main__":
    main()
