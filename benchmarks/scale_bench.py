#!/usr/bin/env python3
"""What a compile costs as the model grows: wall time and peak memory, qcompile vs llama.cpp.

Checkpoints: synthetic Qwen2.5 with the real configurations of 0.5B, 1.5B, 3B and 7B
(:mod:`synthetic`: random bf16 weights with Qwen-like magnitudes, the real tokenizer). Time and memory
depend on the shapes, not the values, so these stand in for the real models; quality is measured
elsewhere (``quality.py``). Where ``--layers`` cuts a configuration (7B by default: its 15 GB of bf16
would take most of a CI disk and an hour per row here), each row is run at two layer counts and the
time extrapolated linearly to the real count (``a + b * layers``); peak memory is the larger of the two
runs (the streamed stages hold one layer, so it must not grow with the layer count: the two figures are
printed side by side so that can be checked).

Rows (each one command, timed as a whole by wall clock; the same calibration text for every row):

* ``rtn``       qcompile --quant Q4_K_M --method rtn          vs  llama.cpp convert (F16) + llama-quantize
* ``default``   qcompile --bits 4 (self-calibration, imatrix, vs  convert + llama-imatrix on as many tokens
                  types by sensitivity at Q4_K_M's size)          (32 x 256) + llama-quantize --imatrix
* ``gptq``      qcompile --bits 4 --calib FILE (128 x 512)    vs  convert + llama-imatrix (128 x 512) + quantize
* ``maxsize``   qcompile --bits 4 --method rtn --max-size (llama.cpp's Q4_K_M size; 8 x 512 calibration)
* ``onnx`` / ``openvino``   qcompile --to onnx|openvino --bits 4 --method rtn (int4 g128)

Peak memory: GNU time's maximum RSS of the command's process tree (children included: the llama.cpp
sampler of self-calibration maps its Q8_0 copy, and mapped file pages count as resident), and, sampled
every 0.1 s from /proc, the peak *anonymous* memory of the tree (what the process itself allocated;
file pages are the page cache's and can be dropped).

    python benchmarks/scale_bench.py [--sizes 0.5B 1.5B 7B] [--rows rtn default ...] [--layers 7B=4,2]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tools import SHARED, machine, table, tools  # noqa: E402
from synthetic import CONFIGS, build  # noqa: E402
from unseen_bench import qcompile_source  # noqa: E402

from qcompile import memwatch  # noqa: E402

ROWS = ("rtn", "default", "gptq", "maxsize", "onnx", "openvino")
PEERS = {"rtn": "llama.cpp convert + quantize", "default": "convert + imatrix (32x256) + quantize",
         "gptq": "convert + imatrix (128x512) + quantize"}
SELF = (32, 256)       # qcompile's self-calibration default (calibration/selfgen.py)
FILE = (128, 512)      # --calib FILE default on a CPU


def run(cmd: list, log: Path, env: dict | None = None) -> dict:
    """Run ``cmd``: wall seconds, GNU time's max RSS (MB) and the sampled peak anonymous RSS of the tree (MB)."""
    r = memwatch.run(["/usr/bin/time", "-f", "QCOMPILE_MAXRSS_KB=%M", *cmd], log=log, every=0.1, env=env)
    text = log.read_text(errors="replace")
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}); see {log}:\n{text[-2000:]}")
    kb = int(text.rsplit("QCOMPILE_MAXRSS_KB=", 1)[1].split()[0])
    # the 1-minute load average at the end: > the core count means others shared the CPU (slower rows)
    return {"s": r.seconds, "rss_mb": kb / 1024, "anon_mb": r.anon_mb, "load": os.getloadavg()[0]}


def calib_file(work: Path) -> Path:
    """The calibration text of every row (ours and the peers'): python-docs, enough for 128 x 512 tokens."""
    p = work / "calib.txt"
    if not p.exists():
        p.write_text((SHARED / "corpora" / "python-docs.txt").read_text(encoding="utf-8", errors="replace"))
    return p


def ours(row: str, model: Path, out: Path, calib: Path, max_size: int | None) -> list:
    q = [sys.executable, "-m", "qcompile", model, "--out", out, "--no-verify", "--force", "-q"]
    return {
        "rtn": q + ["--quant", "Q4_K_M", "--method", "rtn"],
        "default": q + ["--bits", "4"],
        "gptq": q + ["--bits", "4", "--method", "gptq", "--calib", calib, "--calib-samples", FILE[0],
                     "--calib-seqlen", FILE[1]],
        "maxsize": q + ["--bits", "4", "--method", "rtn", "--max-size", max_size, "--calib", calib,
                        "--calib-samples", 8, "--calib-seqlen", 512],
        "onnx": q + ["--to", "onnx", "--bits", "4", "--method", "rtn"],
        "openvino": q + ["--to", "openvino", "--bits", "4", "--method", "rtn"],
    }[row]


def predict(cmd: list, env: dict) -> dict:
    """qcompile's own forecast for ``cmd`` (``--dry-run``: the plan's peak memory and total time)."""
    import subprocess
    r = subprocess.run([str(c) for c in cmd] + ["--dry-run"], capture_output=True, text=True, check=False,
                       env={**os.environ, **env})
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("peak / total")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"--dry-run failed ({r.returncode}):\n{r.stdout[-1000:]}{r.stderr[-2000:]}")
    gb = float(line.split()[3].removesuffix("GB"))
    lines = r.stdout.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("stage"))
    stages = {m[1]: float(m[2]) for ln in lines[first + 1:] if not ln.startswith("peak / total")
              for m in [re.match(r"^(.*?)\s+([\d.]+)GB\s+[\d.]+GB\s+", ln)] if m}
    return {"s": float(line.rsplit("(", 1)[1].split()[0]), "anon_mb": gb * 1024, "stages_gb": stages}


def peer(row: str, model: Path, work: Path, calib: Path, t: dict) -> dict:
    """llama.cpp's pipeline for ``row``: convert to F16, [imatrix,] quantize; times and peaks combined."""
    f16, out = work / "f16.gguf", work / "llama-Q4_K_M.gguf"
    steps = [run([sys.executable, t["convert"], model, "--outtype", "f16", "--outfile", f16], work / "convert.log")]
    qargs = []
    if row in ("default", "gptq"):
        n, ctx = SELF if row == "default" else FILE
        imat = work / f"imatrix-{row}.gguf"
        steps.append(run([t["imatrix"], "-m", f16, "-f", calib, "-c", ctx, "--chunks", n, "-o", imat,
                          "-t", os.cpu_count()], work / "imatrix.log"))
        qargs = ["--imatrix", imat]
    steps.append(run([t["quantize"], *qargs, f16, out, "Q4_K_M", os.cpu_count()], work / "quantize.log"))
    res = {"s": sum(s["s"] for s in steps), "rss_mb": max(s["rss_mb"] for s in steps),
           "anon_mb": max(s["anon_mb"] for s in steps), "bytes": out.stat().st_size}
    f16.unlink()
    return res


def measure_row(size: str, layers: int | None, row: str, work: Path, calib: Path, t: dict, cache: dict,
                with_peer: bool, code: tuple[Path, str, str], pcode: tuple[Path, str, str] | None = None) -> dict:
    """Both sides of one row at one layer count. Cached: ours by the code version it ran (``code``: the
    clean export of a commit to import qcompile from, its cache key, its label), the peer by llama.cpp
    version (it does not change with our code), the forecast by the code that made it (``pcode``,
    default ``code``)."""
    from importlib import metadata
    src, key_code, label = code
    psrc, pkey, plabel = pcode or code
    model = build(size, work / f"synth-{size}-{layers or 'all'}", layers)
    d = work / f"out-{size}-{layers or 'all'}-{row}"
    d.mkdir(parents=True, exist_ok=True)
    res: dict = {"commit": label}
    where = machine()  # timings are the machine's; the compute dtype (and so the work) follows its CPU
    peer_row = "rtn" if row == "maxsize" else row
    if with_peer and peer_row in PEERS:
        key = f"peer|{size}|{layers}|{peer_row}|llama-cpp-python {metadata.version('llama_cpp_python')}|{where}"
        if key not in cache:
            cache[key] = peer(peer_row, model, d, calib, t)
        res["peer"] = cache[key]
    max_size = res.get("peer", {}).get("bytes")
    if row != "maxsize" or max_size:
        key = f"ours|{size}|{layers}|{row}|{key_code}|{where}"
        # PYTHONSAFEPATH: neither the cwd nor a child's may shadow the exported source
        if key not in cache:
            cache[key] = run(ours(row, model, d, calib, max_size), d / "qcompile.log",
                             env={"PYTHONPATH": str(src), "PYTHONSAFEPATH": "1"})
        res["ours"] = cache[key]
        pk = f"ours|{size}|{layers}|{row}|{pkey}|{where}|predicted"
        if pk not in cache:
            cache[pk] = predict(ours(row, model, d, calib, max_size), {"PYTHONPATH": str(psrc), "PYTHONSAFEPATH": "1"})
        res["predicted"] = {**cache[pk], "commit": plabel}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["0.5B", "1.5B", "7B"], choices=list(CONFIGS))
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--layers", default="7B=4,2",
                    help="cut configurations: SIZE=L1,L2 (run at L1 and L2 layers, extrapolate); comma-separated")
    ap.add_argument("--no-peer", action="store_true", help="qcompile rows only")
    ap.add_argument("--code", default="head",
                    help="qcompile to measure: head (a clean export of HEAD, default), a commit, or tree (as it is)")
    ap.add_argument("--predict-code", default=None,
                    help="qcompile whose --dry-run forecast is shown (head, a commit or tree; default: --code)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile-bench" / "scale")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    cuts = {k: [int(x) for x in v.split(",")] for k, v in (s.split("=") for s in a.layers.split(";") if s)}
    t = tools()
    src, key_code, label, _ = qcompile_source(a.work, a.code)
    pcode = qcompile_source(a.work, a.predict_code)[:3] if a.predict_code else None
    calib = calib_file(a.work)
    cache_file = a.work / "results.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    rows = []
    for size in a.sizes:
        full = CONFIGS[size]["num_hidden_layers"] if "num_hidden_layers" in CONFIGS[size] else None
        counts = cuts.get(size, [None])
        for row in a.rows:
            runs = []
            for n in counts:
                runs.append(measure_row(size, n, row, a.work, calib, t, cache, not a.no_peer, (src, key_code, label),
                                        pcode))
                cache_file.write_text(json.dumps(cache, indent=1))
            rows.append(summarise(size, row, counts, full, runs))
    print(f"machine: {machine()}; synthetic Qwen2.5 checkpoints (benchmarks/synthetic.py); wall clock "
          "of each whole command; RSS = GNU time max RSS of the process tree (mapped files included), "
          "anon = sampled peak anonymous RSS of the tree; predicted = the same command's --dry-run plan "
          "(total time; peak memory, which the plan counts without mapped files: compare with anon)")
    print(table(["size", "row", "qcompile s", "RSS MB", "anon MB", "predicted s", "pred/meas", "predicted MB",
                 "pred/meas", "peer", "peer s", "peer RSS MB",
                 "time ratio", "RSS ratio", "commit", "note"], rows))


def summarise(size: str, row: str, counts: list, full: int | None, runs: list[dict]) -> list:
    def pick(side: str, field: str) -> float | None:
        vals = [r[side][field] for r in runs if side in r]
        if not vals:
            return None
        if field != "s" or len(counts) < 2:
            return max(vals)
        (l1, t1), (l2, t2) = zip(counts, vals)
        b = (t1 - t2) / (l1 - l2)
        return t1 + b * (full - l1)  # linear in the layer count
    o_s, o_rss, o_anon = pick("ours", "s"), pick("ours", "rss_mb"), pick("ours", "anon_mb")
    e_s, e_anon = pick("predicted", "s"), pick("predicted", "anon_mb")
    p_s, p_rss = pick("peer", "s"), pick("peer", "rss_mb")
    f = lambda x, d=0: "-" if x is None else f"{x:.{d}f}"
    note = ""
    if len(counts) > 1:
        per = {n: (r.get("ours", {}).get("rss_mb"), r.get("ours", {}).get("s")) for n, r in zip(counts, runs)}
        note = f"{full} layers extrapolated from " + ", ".join(
            f"{n}: {f(s)} s / {f(m)} MB" for n, (m, s) in per.items())
    pr = lambda e, o: "-" if not (e and o) else f"{e / o:.2f}"
    return [size, row, f(o_s), f(o_rss), f(o_anon), f(e_s), pr(e_s, o_s), f(e_anon), pr(e_anon, o_anon), PEERS.get(row, "llama.cpp Q4_K_M size" if row == "maxsize" else "-"),
            f(p_s), f(p_rss), "-" if not (o_s and p_s) else f"{o_s / p_s:.2f}",
            "-" if not (o_rss and p_rss) else f"{o_rss / p_rss:.2f}",
            runs[0].get("commit", "-") + (f" (forecast {runs[0]['predicted']['commit']})"
                                          if runs[0].get("predicted", {}).get("commit", runs[0].get("commit"))
                                          != runs[0].get("commit") else ""), note]


if __name__ == "__main__":
    main()
