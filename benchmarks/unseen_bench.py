#!/usr/bin/env python3
"""Quantization quality on held-out text unlike any calibration, scored by llama.cpp itself.

Sets: benchmarks/heldout.py (17th-century English prose, C source, five non-English languages, plain
chat-bot transcripts; none shares a 200-character substring with the calibration corpora). Each GGUF
is scored on every set with ``llama-perplexity --kl-divergence`` against llama.cpp's own F16 of the
model (convert_hf_to_gguf.py): mean KL divergence, PPL and top-1 agreement per set and over the sets.

Rows:

* ``llama-quantize TYPE`` — the peer, no importance matrix;
* ``llama-quantize --imatrix TYPE`` — ``llama-imatrix`` run on ``--peer-calib`` (default
  ../shared/corpora/python-docs.txt): exactly the token windows qcompile would take from that file
  (calibration.sources.calibration_tokens: ``--peer-samples`` x ``--peer-seqlen`` tokens, ``--peer-seed``),
  decoded and written to a text file for ``llama-imatrix -c SEQLEN --chunks SAMPLES``;
* ``--ours "LABEL:ARGS"`` (repeatable) — ``qcompile MODEL --to gguf ARGS --out DIR --no-verify``,
  by default from a clean export of this repository's HEAD commit (``--qcompile-src COMMIT``: another
  commit; ``tree``: the working tree as it is, uncommitted changes included, keyed by their hash).

Every build and every score is cached in ``--work``/results.json, keyed by what changes it: the
row's command line(s), the model directory's files, the llama.cpp version, the qcompile code (the git
tree ids of its folders at the commit, so a commit that changes no code reuses the rows; the commit is
recorded), the set's sha256, ctx and chunks. Rerunning with more ``--ours`` rows or sets only computes what is new.

    python benchmarks/unseen_bench.py [--model DIR] [--ctx 512] [--chunks 6] [--type Q4_K_M]
        [--peer-calib FILE] [--peer-samples 32] [--peer-seqlen 512] [--peer-seed 0] [--no-peers]
        [--ours "rtn:--quant Q4_K_M --method rtn"] [--ours "default:--bits 4"] [--json FILE]
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import heldout  # noqa: E402
from _tools import SHARED, machine, measure, table, tools  # noqa: E402
from kld_bench import MODEL_NOTE, REAL, f16_baseline, real_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ["qcompile", "quantizers", "calibration", "exporters", "pyproject.toml"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_id(model: Path) -> str:
    """Identity of a checkpoint directory: its path and every file's name, size and mtime."""
    files = sorted(p for p in model.rglob("*") if p.is_file())
    desc = [str(model.resolve())] + [f"{p.relative_to(model)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return sha256("\n".join(desc).encode())[:12]


def git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True).stdout


def qcompile_source(work: Path, mode: str) -> tuple[Path, str, str, str]:
    """(directory to import qcompile from, cache key, label, commit). ``head`` or a commit: a clean export of
    that commit, so other people's uncommitted edits in the tree never leak into a row said to be a
    commit's; keyed by the git tree ids of the code folders, so commits that change no code reuse the
    cache. ``tree``: the working tree as it is, keyed by the hash of its changes."""
    commit = git("rev-parse", "HEAD" if mode in ("head", "tree") else f"{mode}^{{commit}}").decode().strip()
    trees = []
    for d in CODE_DIRS:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", f"{commit}:{d}"], capture_output=True, text=True)
        trees.append(f"{d}={r.stdout.strip() if r.returncode == 0 else '-'}")
    code = "code " + sha256(" ".join(trees).encode())[:16]
    if mode == "tree":
        diff = git("diff", commit, "--", *CODE_DIRS)
        untracked = git("ls-files", "--others", "--exclude-standard", "--", *CODE_DIRS).decode().split()
        h = sha256(diff + b"".join(f.encode() + (REPO / f).read_bytes() for f in sorted(untracked)))[:12]
        dirty = bool(diff or untracked)
        return REPO, f"{code}+tree:{h}" if dirty else code, commit[:7] + ("+dirty" if dirty else ""), commit
    src = work / "src" / commit
    if not (src / ".done").exists():
        src.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(git("archive", "--format=tar", commit))) as t:
            t.extractall(src, filter="data")
        (src / ".done").write_text(commit)
    return src, code, commit[:7], commit


def peer_calib_text(work: Path, model: Path, spec: Path, samples: int, seqlen: int, seed: int) -> tuple[Path, str]:
    """qcompile's calibration windows for ``--calib spec``, decoded into a text file for llama-imatrix; and
    a note on how many of llama-imatrix's chunks (re-tokenized text) equal qcompile's windows."""
    from tokenizers import Tokenizer

    from calibration.sources import calibration_tokens
    windows = calibration_tokens(str(spec), model, samples, seqlen, seed)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    text = "".join(tok.decode([int(i) for i in w], skip_special_tokens=False) for w in windows)
    path = work / f"peer-calib-{sha256(text.encode())[:12]}.txt"
    if not path.exists():
        path.write_text(text, encoding="utf-8")
    ids = tok.encode(text, add_special_tokens=False).ids
    flat = [int(x) for x in windows.reshape(-1)]
    # only the joins between windows can re-tokenize differently: count the tokens that match in order
    same = sum(b.size for b in difflib.SequenceMatcher(None, flat, ids, autojunk=False).get_matching_blocks())
    note = (f"llama-imatrix on {samples} x {seqlen} tokens of {spec.name}: the windows qcompile takes for "
            f"--calib {spec.name} --calib-samples {samples} --calib-seqlen {seqlen} --seed {seed}, decoded "
            f"to {path.name} (re-tokenized: {len(ids)} tokens, {same} of qcompile's {len(flat)} matched in order)")
    return path, note


def score(perplexity: Path, gguf: Path, base: Path, text: Path, ctx: int, chunks: int) -> dict:
    """llama-perplexity --kl-divergence of ``gguf`` against the saved F16 logits ``base``."""
    r = measure([perplexity, "-m", gguf, "-f", text, "-c", ctx, "--chunks", chunks, "--kl-divergence-base", base,
                 "--kl-divergence", "-t", os.cpu_count()])
    grab = lambda pat: [float(x) for x in re.search(pat, r.output).groups()]
    kld, kld_err = grab(r"Mean\s+KLD:\s+([-0-9.]+)\s+±\s+([0-9.]+)")
    return {"kld": kld, "kld_err": kld_err, "ppl": grab(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)")[0],
            "ppl_base": grab(r"Mean PPL\(base\)\s*:\s*([0-9.]+)")[0],
            "top1": grab(r"Same top p:\s+([0-9.]+)")[0], "seconds": r.seconds}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REAL)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile-bench" / "unseen")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--type", default="Q4_K_M", help="llama.cpp type of the peer rows")
    ap.add_argument("--peer-calib", type=Path, default=SHARED / "corpora" / "python-docs.txt")
    ap.add_argument("--peer-samples", type=int, default=32)
    ap.add_argument("--peer-seqlen", type=int, default=512)
    ap.add_argument("--peer-seed", type=int, default=0)
    ap.add_argument("--no-peers", action="store_true", help="only the --ours rows")
    ap.add_argument("--ours", action="append", default=[], metavar="LABEL:ARGS",
                    help="a qcompile row: LABEL, a colon, then qcompile options (repeatable)")
    ap.add_argument("--external", action="append", default=[], metavar="LABEL:VERSION:COMMAND",
                    help="another tool's row: COMMAND (a shell command; {out} is a fresh directory it writes one "
                         "GGUF into) as LABEL; VERSION names the tool's version for the cache key and the table "
                         "(repeatable)")
    ap.add_argument("--qcompile-src", default="head", metavar="head|tree|COMMIT",
                    help="run qcompile from a clean export of HEAD (default) or of COMMIT, or from the working tree")
    ap.add_argument("--sets", nargs="+", choices=list(heldout.SETS), default=list(heldout.SETS))
    ap.add_argument("--text", action="append", default=[], metavar="NAME=FILE",
                    help="also score on FILE (e.g. in-domain held-out text), shown as its own column and left out "
                         "of the unseen sets' mean (repeatable)")
    ap.add_argument("--json", type=Path, help="write the table here too (default: WORK/table.json)")
    args = ap.parse_args(argv)

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t = tools()
    model = real_model(args.model).resolve()
    mid = model_id(model)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"builds": {}, "scores": {}}

    def save() -> None:
        """Merge this run's records into results.json under a lock: two benchmark runs sharing a work folder
        (a long peer beside a short row) each keep what the other wrote."""
        import fcntl
        with open(work / ".results.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if results_path.exists():
                disk = json.loads(results_path.read_text())
                for part in ("builds", "scores"):
                    results[part] = {**disk.get(part, {}), **results[part]}
            tmp = results_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
            tmp.replace(results_path)

    def build(label, method, key, commit, make) -> dict:
        """The row's build record: from results.json when its artifact still exists, else built now."""
        b = results["builds"].get(key)
        if b is None or not Path(b["gguf"]).exists():
            log(f"building: {label}")
            gguf, seconds, peak_mb, commands = make()
            b = {"label": label, "method": method, "commit": commit, "commands": commands, "seconds": seconds,
                 "peak_rss_mb": peak_mb, "bytes": gguf.stat().st_size, "gguf": str(gguf)}
            results["builds"][key] = b
            save()
        return b

    all_sets = heldout.build(work / "heldout")
    sets = {n: all_sets[n] for n in args.sets}
    sources = {n: heldout.SOURCES[n] for n in args.sets}
    for spec in args.text:
        name, _, path = spec.partition("=")
        if not path or name in sets:
            ap.error(f"--text {spec!r}: expected NAME=FILE with a new NAME")
        sets[name], sources[name] = Path(path).resolve(), f"--text {path}"
    unseen = list(args.sets)  # the mean is over these only
    set_sha = {n: sha256(p.read_bytes()) for n, p in sets.items()}
    set_tokens = {n: heldout.n_tokens(p.read_text(encoding="utf-8")) for n, p in sets.items()}
    for n, k in set_tokens.items():
        if k < args.ctx * args.chunks:
            raise SystemExit(f"set {n}: {k} tokens < ctx x chunks = {args.ctx * args.chunks}")

    # llama.cpp's F16 and, per set, its saved logits (the KLD reference)
    f16_dir = work / f"f16-{mid}"
    f16 = f16_dir / "convert-F16.gguf"
    if not f16.exists():
        f16_dir.mkdir(parents=True, exist_ok=True)
        log(f"convert_hf_to_gguf.py {model} -> {f16}")
        measure([sys.executable, t["convert"], model, "--outtype", "f16", "--outfile", f16.with_suffix(".part")])
        f16.with_suffix(".part").replace(f16)
    bases = {}
    for n, p in sets.items():
        d = work / "base" / f"{n}-{set_sha[n][:12]}-c{args.ctx}-n{args.chunks}-{mid}"
        if not (d / ".done").exists():
            d.mkdir(parents=True, exist_ok=True)
            if not (d / "convert-F16.gguf").exists():
                (d / "convert-F16.gguf").symlink_to(f16)
            log(f"F16 logits on {n} ({args.chunks} x {args.ctx})")
            f16_baseline(t, model, d, p, args.ctx, args.chunks)  # finds the F16 there, writes d/f16.kld
            (d / ".done").write_text("ok")
        bases[n] = d / "f16.kld"

    # rows: (label, method, build key, commit, build function -> (gguf, seconds, peak RSS MiB, commands))
    rows = []
    typ = args.type
    llama = t["quantize"].parents[2].name  # llama.cpp-<llama-cpp-python version>: the tools' version
    (work / "rows").mkdir(exist_ok=True)
    if not args.no_peers:
        def plain():
            out = work / "rows" / f"llama-quantize-{typ}-{mid}.gguf"
            cmd = [t["quantize"], f16, out, typ, os.cpu_count()]
            r = measure(cmd)
            return out, r.seconds, r.peak_rss_mb, [" ".join(map(str, cmd))]
        rows.append((f"llama-quantize {typ}", "llama-quantize", f"{llama} llama-quantize {typ} | F16 of model {mid}", None,
                     plain))
        calib, calib_note = peer_calib_text(work, model, args.peer_calib.resolve(), args.peer_samples,
                                            args.peer_seqlen, args.peer_seed)
        im_key = f"{llama} llama-imatrix -f {calib.name} -c {args.peer_seqlen} --chunks {args.peer_samples}"

        def with_imatrix():
            im = work / "rows" / f"imatrix-{calib.stem}-{mid}.gguf"
            out = work / "rows" / f"llama-quantize-imatrix-{typ}-{calib.stem}-{mid}.gguf"
            cmd1 = [t["imatrix"], "-m", f16, "-f", calib, "-o", im, "-c", args.peer_seqlen, "--chunks",
                    args.peer_samples, "-t", os.cpu_count()]
            r1 = measure(cmd1)
            cmd2 = [t["quantize"], "--imatrix", im, f16, out, typ, os.cpu_count()]
            r2 = measure(cmd2)
            return (out, r1.seconds + r2.seconds, max(r1.peak_rss_mb, r2.peak_rss_mb),
                    [" ".join(map(str, cmd1)), " ".join(map(str, cmd2))])
        rows.append((f"llama-quantize --imatrix {typ}", "llama-quantize --imatrix",
                     f"{im_key} ; llama-quantize --imatrix {typ} | F16 of model {mid}", None, with_imatrix))
    else:
        calib_note = "no peer rows"
    # our rows depend on the machine (the compute dtype follows the CPU: quantizers.linalg.compute_dtype)
    where = f"machine {machine()}"
    if args.ours:
        src, version, short, commit_id = qcompile_source(work, args.qcompile_src)
    for spec in args.ours:
        label, _, opts = spec.partition(":")
        if not opts:
            ap.error(f"--ours {spec!r}: expected LABEL:ARGS")
        if "{peer_bytes}" in opts:  # a size budget equal to llama-quantize TYPE's file: build that row first
            if args.no_peers:
                ap.error(f"--ours {spec!r}: {{peer_bytes}} needs the peer rows")
            opts = opts.replace("{peer_bytes}", str(build(*rows[0])["bytes"]))
        extra = shlex.split(opts)

        def ours(label=label, extra=extra, opts=opts):
            out_dir = work / "rows" / f"qcompile-{sha256(f'{version} {opts} {where}'.encode())[:12]}"
            cmd = [sys.executable, "-m", "qcompile", model, "--to", "gguf", *extra, "--out", out_dir, "--no-verify",
                   "--force", "-q"]
            # PYTHONSAFEPATH: neither this process's cwd nor the worker children's may shadow ``src``
            r = measure(cmd, env={"PYTHONPATH": str(src), "PYTHONSAFEPATH": "1"})
            ggufs = sorted(out_dir.glob("*.gguf"))
            if len(ggufs) != 1:  # (the folder is per code version and options: one artifact)
                raise SystemExit(f"--ours {label}: expected one GGUF in {out_dir}, found {ggufs}")
            return ggufs[0], r.seconds, r.peak_rss_mb, [f"PYTHONPATH={src} PYTHONSAFEPATH=1 " + " ".join(map(str, cmd))]
        rows.append((f"qcompile {label} @{short}", f"qcompile {opts}",
                     f"qcompile {opts} | model {mid} | {version} | {where}", commit_id, ours))

    for spec in args.external:
        label, version_x, command = (spec.split(":", 2) + ["", ""])[:3]
        if not command:
            ap.error(f"--external {spec!r}: expected LABEL:VERSION:COMMAND")

        def external(label=label, version_x=version_x, command=command):
            out_dir = work / "rows" / f"external-{sha256(f'{version_x} {command} {mid}'.encode())[:12]}"
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            cmd = command.replace("{out}", shlex.quote(str(out_dir)))
            r = measure(["bash", "-c", cmd])
            ggufs = sorted(out_dir.rglob("*.gguf"))
            if len(ggufs) != 1:
                raise SystemExit(f"--external {label}: expected one GGUF under {out_dir}, found {ggufs}")
            return ggufs[0], r.seconds, r.peak_rss_mb, [cmd]
        rows.append((f"{label} ({version_x})", label, f"external {version_x} {command} | model {mid}", None,
                     external))

    if not rows:
        ap.error("no rows: give --ours or drop --no-peers")
    # build (unless every score is cached already) and score
    table_rows = []
    for label, method, key, commit, make in rows:
        skey = lambda n: f"{key} | set {n} sha256={set_sha[n]} | ctx={args.ctx} chunks={args.chunks} | {llama}"
        missing = [n for n in sets if skey(n) not in results["scores"]]
        b = results["builds"].get(key)
        if missing or b is None:
            b = build(label, method, key, commit, make)
        for n in missing:
            log(f"scoring: {label} on {n}")
            results["scores"][skey(n)] = score(t["perplexity"], Path(b["gguf"]), bases[n], sets[n], args.ctx,
                                               args.chunks)
            save()
        sc = {n: results["scores"][skey(n)] for n in sets}
        table_rows.append({"label": label, "method": method, "commit": commit, "built_at_commit": b["commit"],
                           "build_key": key,
                           "commands": b["commands"], "seconds": b["seconds"], "peak_rss_mb": b.get("peak_rss_mb"),
                           "bytes": b["bytes"], "scores": sc,
                           "mean_kld": sum(sc[n]["kld"] for n in unseen) / len(unseen),
                           "mean_ppl_ratio": math.exp(sum(math.log(sc[n]["ppl"] / sc[n]["ppl_base"]) for n in unseen)
                                                      / len(unseen)),
                           "mean_top1": sum(sc[n]["top1"] for n in unseen) / len(unseen)})

    peer = next((r for r in table_rows if r["method"] == "llama-quantize --imatrix"), None)
    ref = peer and peer["mean_kld"]
    extra_sets = [n for n in sets if n not in unseen]
    for r in table_rows:
        r["mean_kld_vs_imatrix_peer"] = r["mean_kld"] / ref if ref else None
        for n in extra_sets:
            r[f"{n}_kld_vs_imatrix_peer"] = r["scores"][n]["kld"] / peer["scores"][n]["kld"] if peer else None
    names = list(sets)
    header = (f"model: {model} ({MODEL_NOTE})\n{where} (qcompile's rows are keyed by it)\n"
              f"held-out sets (unseen: benchmarks/heldout.py; 'mean' is over these): "
              + "; ".join(f"{n} {set_tokens[n]} tokens sha256 {set_sha[n][:12]}" for n in unseen) + "\n"
              + "".join(f"also scored, not in the mean: {n} ({sources[n]}) {set_tokens[n]} tokens sha256 "
                        f"{set_sha[n][:12]}\n" for n in extra_sets)
              + f"scores: llama-perplexity --kl-divergence vs convert_hf_to_gguf F16, -c {args.ctx} --chunks "
              f"{args.chunks} (the first {args.ctx * args.chunks} tokens of each set; the second half of each "
              f"chunk scored)\npeer: {calib_note}")
    print(header)
    fmt = lambda x, f: "-" if x is None else format(x, f)
    lead = lambda r: [r["label"], f"{r['bytes'] / 2**20:.1f}", f"{r['seconds']:.0f}", fmt(r["peak_rss_mb"], ".0f")]
    print("\nmean KL divergence vs F16 (lower is better)")
    print("(time s: wall clock of the row's whole command(s); peak RSS MiB: GNU time's maximum resident set of the "
          "largest command, '-' for rows built before it was recorded)")
    print(table(["method", "MiB", "time s", "peak RSS MiB", *names, "mean", "mean / imatrix peer",
                 *(f"{n} / imatrix peer" for n in extra_sets)],
                [[*lead(r), *(f"{r['scores'][n]['kld']:.5f}" for n in names), f"{r['mean_kld']:.5f}",
                  fmt(r["mean_kld_vs_imatrix_peer"], ".2f"),
                  *(fmt(r[f"{n}_kld_vs_imatrix_peer"], ".2f") for n in extra_sets)] for r in table_rows]))
    errs = [r["scores"][n]["kld_err"] for r in table_rows for n in names]
    print(f"(llama-perplexity's standard error of each per-set KLD: {min(errs):.5f} to {max(errs):.5f}; every row "
          f"is scored on the same tokens, so differences between rows are more certain than that)")
    base_ppl = {n: table_rows[0]["scores"][n]["ppl_base"] for n in names}  # the same F16 logits in every row
    print("\nperplexity (F16 first; last column: geometric mean of PPL / F16 PPL over the unseen sets)")
    print(table(["method", *names, "PPL / F16"],
                [["F16 (convert_hf_to_gguf)", *(fmt(base_ppl[n], ".3f") for n in names), "1.0000"]]
                + [[r["label"], *(f"{r['scores'][n]['ppl']:.3f}" for n in names), f"{r['mean_ppl_ratio']:.4f}"]
                   for r in table_rows]))
    print("\ntop-1 agreement with F16, % (higher is better)")
    print(table(["method", *names, "mean (unseen)"],
                [[r["label"], *(f"{r['scores'][n]['top1']:.2f}" for n in names), f"{r['mean_top1']:.2f}"]
                 for r in table_rows]))
    out = args.json or work / "table.json"
    out.write_text(json.dumps({"header": header, "model": str(model), "model_id": mid, "ctx": args.ctx,
                               "chunks": args.chunks, "peer_calibration": calib_note,
                               "sets": {n: {"path": str(sets[n]), "sha256": set_sha[n], "tokens": set_tokens[n],
                                            "source": sources[n], "f16_ppl": base_ppl[n],
                                            "in_mean": n in unseen} for n in names},
                               "rows": table_rows}, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
