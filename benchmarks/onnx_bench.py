#!/usr/bin/env python3
"""ONNX on the CPU: our int4 folder vs the float32 graph and onnxruntime's own int4 quantizer.

Real Qwen2.5-Coder-0.5B-Instruct (../shared/tools/real_qwen.py). Three folders:

* **fp32 (optimum)** — ``optimum.exporters.onnx`` (text-generation-with-past), the float graph users get
  today; optimum-onnx pins transformers < 4.58, so it runs over ``benchmarks/optimum_overlay.py``;
* **fp32 (qcompile)** — the float graph from our own exporter (``torch.onnx.export``, same I/O);
* **ORT int4** — onnxruntime's ``MatMulNBitsQuantizer`` (block 128, asymmetric, round to nearest) applied
  to optimum's fp32 graph, the peer, with ``accuracy_level`` 4 (int8 activations) and 0 (float), lm_head
  quantized or left float;
* **qcompile int4** — ``qcompile --to onnx --bits 4`` (INT4_G128, GPTQ on held-out calibration text), with
  int8 activations (the default) and ``--float-activations``.

Every row says its activation mode and the code it came from (onnxruntime's version, or the qcompile
commit); folders are keyed by those and every option, so a cached folder is never another version's.

For each: size on disk, session load time, prompt (prefill) and decode tokens/s on ``--threads`` threads
with the KV cache, and mean KLD / top-1 / perplexity against the bf16 checkpoint on held-out text
(``qcompile eval --artifact DIR``, in onnxruntime).

    python benchmarks/onnx_bench.py [--threads 2] [--samples 128]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tools import commit, folder_quality, measure, table  # noqa: E402
from kld_bench import MODEL_NOTE, REAL, eval_text, real_model  # noqa: E402
from quality import calib_text  # noqa: E402


def fp32_folder(model: Path, out: Path) -> Path:
    from exporters.onnx import write_onnx
    from qcompile.model import read_config
    if not (out / "model.onnx").exists():
        out.mkdir(parents=True, exist_ok=True)
        write_onnx(out, model, read_config(model), {})
    return out


_OPTIMUM_EXPORT = """
import sys
from optimum.exporters.onnx import main_export
main_export(sys.argv[1], output=sys.argv[2], task="text-generation-with-past", do_validation=False)
"""


def optimum_folder(model: Path, out: Path) -> Path:
    """optimum's own fp32 export (in the transformers-4.57 overlay), plus our tokenizer files for eval."""
    import optimum_overlay
    if not (out / "model.onnx").exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        optimum_overlay.run(_OPTIMUM_EXPORT, str(model), str(tmp))
        for f in model.iterdir():
            if f.name.startswith("tokenizer") and not (tmp / f.name).exists():
                shutil.copyfile(f, tmp / f.name)
        tmp.rename(out)
    return out


def ort_int4_folder(fp32: Path, work: Path, exclude: tuple[str, ...] = (), accuracy_level: int = 0) -> Path:
    """onnxruntime's own quantizer over the fp32 graph (the peer); ``exclude``: MatMul nodes left float;
    ``accuracy_level`` 4: int8 activations (what our folders use by default), 0: float activations. The
    folder is keyed by onnxruntime's version and every setting."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    out = work / (f"ort{onnxruntime.__version__}-int4-acc{accuracy_level}"
                  + (f"-fp-{'-'.join(e.strip('/').replace('/', '_') for e in exclude)}" if exclude else ""))
    if not (out / "model.onnx").exists():
        out.mkdir(parents=True, exist_ok=True)
        q = MatMulNBitsQuantizer(onnx.load(str(fp32 / "model.onnx")), bits=4, block_size=128, is_symmetric=False,
                                 nodes_to_exclude=list(exclude), accuracy_level=accuracy_level)
        q.process()
        q.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
        for f in fp32.iterdir():
            if not f.name.startswith("model.onnx"):
                shutil.copyfile(f, out / f.name)
    return out


def speed(folder: Path, threads: int, prompt: int, decode: int) -> dict:
    """Load time, prefill tokens/s (``prompt`` tokens) and decode tokens/s (``decode`` steps, KV cache)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - t0
    outs = [o.name for o in sess.get_outputs()]
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    ids = np.random.default_rng(0).integers(0, 10000, (1, prompt))

    def step(cur, past, start):
        n = start + cur.shape[1]
        feed = {"input_ids": cur, "attention_mask": np.ones((1, n), np.int64),
                "position_ids": np.arange(start, n, dtype=np.int64)[None], **dict(zip([i.name for i in pasts], past))}
        return dict(zip(outs, sess.run(None, feed)))
    empty = [np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in pasts]
    step(ids[:, :16], empty, 0)  # warm-up
    t1 = time.perf_counter()
    res = step(ids, empty, 0)
    prefill = prompt / (time.perf_counter() - t1)
    past, cur = [res[o] for o in outs[1:]], np.array([[int(res["logits"][0, -1].argmax())]])
    t2 = time.perf_counter()
    for k in range(decode):
        res = step(cur, past, prompt + k)
        past, cur = [res[o] for o in outs[1:]], np.array([[int(res["logits"][0, -1].argmax())]])
    return {"load_s": load, "prefill_tps": prefill, "decode_tps": decode / (time.perf_counter() - t2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REAL)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile-bench" / "onnx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=128, help="GPTQ calibration samples (x 512 tokens)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--build-only", action="store_true",
                    help="make the folders and stop (timings want a quiet machine: measure in a second run)")
    args = ap.parse_args()
    model = real_model(args.model)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    text, calib = eval_text(work), calib_text(work)
    fp32_opt = optimum_folder(model, work / "fp32-optimum")
    fp32 = fp32_folder(model, work / "fp32")
    # the peer in both activation modes, and with lm_head left float (ours keeps it 8-bit: the fairer quality
    # comparison); onnxruntime's int4 RTN is the same weights in both modes
    import onnxruntime
    ort = f"onnxruntime {onnxruntime.__version__}"
    peers = [(f"ORT MatMulNBitsQuantizer int4 RTN{', lm_head float' if ex else ''}", act, ort,
              ort_int4_folder(fp32_opt, work, ex, level))
             for ex in ((), ("/lm_head/MatMul",)) for act, level in (("int8 (acc. level 4)", 4), ("float (acc. level 0)", 0))]
    code = commit()
    ours = []
    for act, extra in (("int8 (acc. level 4)", []), ("float (acc. level 0)", ["--float-activations"])):
        # keyed by the code version and every option; a dirty tree is rebuilt every run, never reused
        key = hashlib.sha256(f"{code} {args.samples} {extra} {calib.read_bytes()!r}".encode()).hexdigest()[:12]
        folder = work / f"qcompile-int4-{key}"
        if code.endswith("+dirty") or not (folder / "model.onnx").exists():
            measure(["qcompile", model, "--to", "onnx", "--bits", "4", "--calib", calib, "--calib-samples",
                     args.samples, *extra, "--out", folder, "--force", "-q", "--no-verify"])
        ours.append(("qcompile int4 GPTQ (lm_head int8)", act, f"qcompile {code}", folder))
    # openvino_bench.py takes the int8-activation folder's weights: say which folder is this commit's
    (work / "qcompile-int4-latest.json").write_text(json.dumps({"folder": str(ours[0][3]), "code": code}))
    if args.build_only:
        return
    rows = []
    for label, act, version, folder in (("fp32 (optimum export)", "float", "optimum-onnx", fp32_opt),
                                        ("fp32 (qcompile export)", "float", f"qcompile {code}", fp32), *peers, *ours):
        size = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
        rows.append((label, act, version, size, speed(folder, args.threads, args.prompt, args.decode),
                     folder_quality(model, folder, text, args.threads)))
    base_decode = rows[0][4]["decode_tps"]
    peer_kld = {act: q["kld_mean"] for label, act, _, _, _, q in rows if label == peers[0][0]}
    peer_head_kld = {act: q["kld_mean"] for label, act, _, _, _, q in rows if label == peers[2][0]}
    print(f"model {model.name} ({MODEL_NOTE}); {args.threads} threads; prompt {args.prompt} tokens, decode "
          f"{args.decode} tokens; KLD vs the bf16 checkpoint on 6 x 512 held-out tokens, in onnxruntime; ratios "
          f"against the peer in the same activation mode")
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    print(table(["model", "activations", "code", "size MiB", "load s", "prefill tok/s", "decode tok/s",
                 "decode x fp32", "PPL", "mean KLD", "KLD / ORT int4", "KLD / ORT int4 head-fp", "top-1 %"],
                [[label, act, version, f"{size / 2**20:.0f}", f"{s['load_s']:.2f}", f"{s['prefill_tps']:.0f}",
                  f"{s['decode_tps']:.1f}", f"{s['decode_tps'] / base_decode:.2f}", f"{q['ppl_quant']:.3f}",
                  f"{q['kld_mean']:.5f}", fmt(q["kld_mean"] / peer_kld[act] if act in peer_kld else None),
                  fmt(q["kld_mean"] / peer_head_kld[act] if act in peer_head_kld else None), f"{100 * q['top1']:.1f}"]
                 for label, act, version, size, s, q in rows]))

if __name__ == "__main__":
    main()
