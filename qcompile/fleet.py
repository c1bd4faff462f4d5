"""``qcompile build MATRIX.toml --out DIR``: a matrix of compiles (models x formats x types x methods), on Ray.

The matrix (docs/fleet.md)::

    [options]                 # every entry: the compile's options, named as on the command line
    calib = "corpus.txt"
    calib-samples = 64

    [[model]]
    path = "./Qwen2.5-0.5B-Instruct"   # MODEL as `qcompile MODEL` takes it; name = "..." names its folder

    [[build]]                 # lists multiply: 2 entries
    to = "gguf"
    quant = ["Q4_K_M", "Q8_0"]

    [[build]]
    to = ["onnx", "openvino"]
    bits = 4
    method = "gptq"

Each entry is one compile with those options into ``DIR/{model}/{to}-{type}-{method}/`` (report.json
included). What a serious fleet needs, and how it is had:

* **one calibration, several formats**: every entry gets the same ``--calib-cache`` (``DIR/.shared``), so the
  tokens are made once per model and calibration, and entries with the same method and grid (ONNX and OpenVINO
  at INT4_G128) share one calibrated run, with identical weights. Such entries run one after the other (a Ray
  dependency), the first calibrating, the rest reading. Each entry's ``build.json`` says what it shared.
* **Ray** runs the entries (an embedded local Ray, or a cluster: ``--ray-address`` / ``RAY_ADDRESS``), each a
  task asking for the CPUs, GPU and memory its plan predicts (:func:`qcompile.api.plan`), so the scheduler never
  packs two compiles into a node that holds one. Without Ray, the same entries run here one by one, with the
  same results (every entry compiles with a fixed thread count, 1 unless ``threads`` says otherwise: float sums,
  and so the bytes, depend on it).
* **idempotent, fault tolerant**: an entry whose inputs' fingerprint (model files, options, calibration and
  evaluation texts, qcompile's version) matches a finished entry in DIR is skipped; an entry compiles into
  ``DIR/.staging`` and is renamed into place whole, so DIR never holds a partial entry; a worker that dies is
  retried by Ray, and its calibrated run resumes from its last finished layer (the shared engine folder).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qcompile import __version__
from qcompile.calib_cache import model_identity, source_identity
from qcompile.errors import QCompileError, UsageError

BUILD_JSON = "build.json"      # an entry's record (DIR/{id}/build.json) and the matrix's (DIR/build.json)
SHARED = ".shared"             # the entries' --calib-cache
STAGING = ".staging"           # entries being compiled, renamed into place when complete
RETRIES = 2                    # Ray re-runs an entry whose worker died this many times
# options an entry cannot set: the build owns where and how it writes
_OWNED = {"model", "out", "force", "quiet", "argv", "dry_run", "resume", "calib_cache"}
_PATHS = {"eval_text", "baseline"}


@dataclass(frozen=True)
class Entry:
    """One compile of the matrix."""
    id: str                     # "{model}/{to}-{type}-{method}": its folder under DIR
    model: str                  # MODEL as the compile takes it (a path made absolute)
    options: dict[str, Any]     # Options fields, JSON-able (paths as strings)

    def compile_options(self, out: Path, cache: Path):
        from qcompile.plan import Options
        kw = {k: Path(v) if k in _PATHS and v is not None else v for k, v in self.options.items()}
        return Options(model=self.model, out=out, calib_cache=cache, quiet=True, argv=["qcompile", "build", self.id],
                       **kw)

    @property
    def slug(self) -> str:
        return self.id.replace("/", "__")


@dataclass
class Matrix:
    path: Path
    entries: list[Entry]


# ---- the matrix file ------------------------------------------------------------------------------------------

def _option_name(key: str, where: str) -> str:
    from qcompile.plan import Options
    name = key.replace("-", "_")
    known = {f.name for f in fields(Options)} - _OWNED
    if name not in known:
        raise UsageError(f"{where}: unknown option {key!r} (compile options: "
                         f"{', '.join(sorted(k.replace('_', '-') for k in known))})")
    return name


def _options(table: dict, where: str, base: Path) -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        name = _option_name(key, where)
        if name in _PATHS or (name == "calib" and isinstance(value, str) and value != "self"
                              and not value.startswith("hf:")):
            value = str((base / value).resolve()) if not Path(value).is_absolute() else value
        out[name] = value
    return out


def _combinations(table: dict) -> list[dict]:
    """A build table's lists multiplied out, in the order the keys are written."""
    combos: list[dict] = [{}]
    for key, value in table.items():
        values = value if isinstance(value, list) else [value]
        if not values:
            return []
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


def _type_label(opts: dict) -> str:
    if opts.get("quant"):
        return str(opts["quant"]).upper()
    if opts.get("max_size"):
        return f"max{opts['max_size']}"
    if opts.get("target_bpw"):
        return f"{opts['target_bpw']}bpw"
    return f"{opts.get('bits') or 4}bit"


def read_matrix(path: Path) -> Matrix:
    """Parse MATRIX.toml into its entries; a one-line error for anything wrong in it."""
    try:
        import tomllib
    except ImportError:   # Python 3.10: the same parser as a package
        try:
            import tomli as tomllib
        except ImportError:
            raise QCompileError("reading MATRIX.toml needs Python 3.11 or `pip install tomli`") from None
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise QCompileError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None
    extra = set(doc) - {"options", "model", "build"}
    if extra:
        raise UsageError(f"{path}: unknown section {sorted(extra)[0]!r} (sections: options, [[model]], [[build]])")
    base = path.parent
    common = _options(doc.get("options", {}), f"{path} [options]", base)
    models, builds = doc.get("model", []), doc.get("build", [])
    if not isinstance(models, list) or not models or not isinstance(builds, list) or not builds:
        raise UsageError(f"{path}: needs at least one [[model]] (with path = ...) and one [[build]] table")
    entries: list[Entry] = []
    for m in models:
        m = dict(m)
        if "path" not in m:
            raise UsageError(f"{path}: a [[model]] table without path = \"...\"")
        given = str(m.pop("path"))
        local = base / given
        model = str(local.resolve()) if local.exists() else given   # a hub id or size alias as written
        name = str(m.pop("name", Path(given).name or given)).replace("/", "-")
        mopts = _options(m, f"{path} [[model]] {given}", base)
        for b in builds:
            b = dict(b)
            label = b.pop("name", None)
            for combo in _combinations(b):
                opts = {**common, **mopts, **_options(combo, f"{path} [[build]]", base)}
                opts.setdefault("threads", 1)   # fixed: the bytes must not depend on where an entry ran
                kind = label or f"{opts.get('to', 'gguf')}-{_type_label(opts)}-{opts.get('method', 'auto')}"
                entries.append(Entry(f"{name}/{kind}", model, opts))
    seen: dict[str, Entry] = {}
    for e in entries:
        if e.id in seen:
            raise UsageError(f"{path}: two entries are both named {e.id!r}; give the [[build]] tables a name = ...")
        seen[e.id] = e
    return Matrix(path, entries)


# ---- fingerprints and records ---------------------------------------------------------------------------------

def _file_sha(p: str | None) -> str | None:
    return source_identity(p) if p and Path(p).exists() else p


def fingerprint(entry: Entry, model_dir: Path) -> str:
    """Everything an entry's artifact depends on: qcompile's version, the model's files, the options, the contents
    of the calibration and evaluation texts and of a baseline report."""
    o = entry.options
    doc = {"qcompile": __version__, "model": model_identity(model_dir), "options": o,
           "calib": _file_sha(o.get("calib")), "eval_text": _file_sha(o.get("eval_text")),
           "baseline": _file_sha(o.get("baseline"))}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def finished(out: Path, entry: Entry, fp: str) -> bool:
    """Whether DIR holds this entry, finished from the same inputs."""
    try:
        rec = json.loads((out / entry.id / BUILD_JSON).read_text())
    except (OSError, ValueError):
        return False
    return rec.get("fingerprint") == fp and (out / entry.id / "report.json").is_file()


@dataclass
class Result:
    id: str
    status: str                  # done | skipped | failed
    seconds: float = 0.0
    error: str | None = None
    node: str | None = None      # the Ray node that ran it (None: this process)
    attempt: int = 1
    calibration: str | None = None
    shares_with: list[str] = field(default_factory=list)


# ---- one entry ---------------------------------------------------------------------------------------------------

class WorkerDied(RuntimeError):
    """An entry's compile process died (killed, out of memory): the scheduler retries the entry."""


def run_entry(entry: Entry, out: Path, fp: str, shares_with: list[str], *after: Any) -> Result:
    """Compile one entry into DIR/.staging in a process of its own, then rename it into place whole. Bad input and
    failed gates are the entry's result (not retried: they would fail again); a compile process that dies raises
    :class:`WorkerDied`, which the scheduler retries. ``after``: the entries this one waits for (Ray passes their
    results once they are done).

    Why a process per entry: BLAS and torch pick their thread pools when they load, from the environment, and float
    sums depend on the thread count; a fresh process with ``OMP_NUM_THREADS`` = the entry's threads gives the same
    bytes wherever the entry runs (a Ray worker, this process), and a compile's memory goes back when it ends."""
    import subprocess
    t0 = time.perf_counter()
    node = _ray_node()
    attempts = out / SHARED / f"attempts-{entry.slug}"
    attempts.parent.mkdir(parents=True, exist_ok=True)
    with open(attempts, "a") as f:
        f.write(f"{os.getpid()}\n")
    attempt = len(attempts.read_text().split())
    staging = out / STAGING / f"{entry.slug}.{uuid.uuid4().hex[:8]}"
    (staging / "out").mkdir(parents=True)
    job = {"entry": asdict(entry), "out": str(staging / "out"), "cache": str(out / SHARED),
           "result": str(staging / "result.json")}
    (staging / "job.json").write_text(json.dumps(job))
    threads = str(entry.options.get("threads") or 1)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    done = lambda status, **kw: Result(entry.id, status, time.perf_counter() - t0, node=node,  # noqa: E731
                                       attempt=attempt, shares_with=shares_with, **kw)
    try:
        with open(staging / "compile.log", "w") as log:
            child = subprocess.Popen([sys.executable, "-m", "qcompile.fleet", str(staging / "job.json")],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
            (staging / "pid").write_text(str(child.pid))   # the compile's process (a test kills it)
            code = child.wait()
        try:
            got = json.loads((staging / "result.json").read_text())
        except (OSError, ValueError):
            raise WorkerDied(f"{entry.id}: its compile process ended with {code} and no result "
                             f"(log: {_keep_log(staging, out, entry)})") from None
        if got["status"] != "done":
            internal = got["error"].startswith("internal error")
            return done("failed", error=got["error"] + (f" (log: {_keep_log(staging, out, entry)})" if internal else ""))
        rec = {"fingerprint": fp, "id": entry.id, "model": entry.model, "options": entry.options,
               "calibration": got.get("calibration"), "shares_calibration_with": shares_with, "node": node,
               "attempt": attempt, "qcompile": __version__}
        (staging / "out" / BUILD_JSON).write_text(json.dumps(rec, indent=2) + "\n")
        _publish(staging / "out", out / entry.id)
        return done("done", calibration=got.get("calibration"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _compile_child(job_path: Path) -> int:
    """The compile process of one entry: result.json says done (with the calibration it used) or the one-line
    error; an internal error also prints its traceback to the entry's log."""
    from qcompile.errors import report_internal_error
    from qcompile.pipeline import compile_model
    job = json.loads(job_path.read_text())
    entry = Entry(**job["entry"])
    try:
        rep = compile_model(entry.compile_options(Path(job["out"]), Path(job["cache"])))
        got = {"status": "done", "calibration": rep.get("calibration")}
    except QCompileError as e:
        got = {"status": "failed", "error": str(e)}
    except Exception as e:  # noqa: BLE001 - reported as the entry's failure, with the traceback in its log
        report_internal_error(f"qcompile build {entry.id}", e)
        got = {"status": "failed", "error": f"internal error: {type(e).__name__}: {e}"}
    Path(job["result"]).write_text(json.dumps(got))
    return 0


def _keep_log(staging: Path, out: Path, entry: Entry) -> Path:
    """A failed compile's output, kept where the next build does not look for entries: DIR/.logs/{entry}.log."""
    logs = out / ".logs"
    logs.mkdir(exist_ok=True)
    shutil.copyfile(staging / "compile.log", logs / f"{entry.slug}.log")
    return logs / f"{entry.slug}.log"


def _die_with_parent() -> None:
    """In the compile process, before it runs: the kernel kills it when the process that started it dies (a Ray
    worker killed or lost), so no orphaned compile keeps a calibration folder locked against the entry's retry."""
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _ray_node() -> str | None:
    if "ray" not in sys.modules:
        return None
    import ray
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _publish(staging: Path, final: Path) -> None:
    """Replace ``final`` by ``staging`` (a previous, stale build of the entry moves aside first)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = staging.parent / f"{staging.name}.old"
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- the matrix ------------------------------------------------------------------------------------------------

@dataclass
class Planned:
    """An entry ready to run: its fingerprint, its resource needs, and the calibrated run it shares."""
    entry: Entry
    fp: str
    cpus: int
    gpus: int
    memory: int                 # bytes: the plan's predicted peak
    share: str | None           # entries with the same key calibrate once (tokens, method, grid)


def plan_entries(matrix: Matrix, out: Path, force: bool) -> tuple[list[Planned], list[Result]]:
    """Each entry planned (:func:`qcompile.api.plan`: every check of its options, before any work) or already
    decided: skipped (finished from the same inputs) or failed (its options cannot compile)."""
    from qcompile import api
    from qcompile.plan import calibration_shape
    todo, decided = [], []
    for e in matrix.entries:
        try:
            # the memory check belongs to the node that runs the entry (the compile checks there); here the plan
            # only sizes the entry's request
            p = api.plan(e.model, **{**e.options, "memory_check": False})
        except QCompileError as err:
            decided.append(Result(e.id, "failed", error=str(err)))
            continue
        fp = fingerprint(e, p.res.path)
        if not force and finished(out, e, fp):
            decided.append(Result(e.id, "skipped"))
            continue
        share = None
        if p.method.needs_calibration:
            spec, n, seqlen = calibration_shape(p.opts, "cpu" if p.opts.device == "auto" else p.opts.device)
            share = json.dumps([str(p.res.path), source_identity(spec), n, seqlen, p.opts.seed, p.method.name,
                                p.target.fingerprint(p)], default=str)
        device = p.opts.device
        todo.append(Planned(e, fp, cpus=int(e.options.get("threads") or 1),
                            gpus=1 if device.startswith("cuda") else 0, memory=int(p.cost.peak.anon), share=share))
    return todo, decided


def chains(todo: list[Planned]) -> dict[str, list[str]]:
    """Entry id -> the ids it waits for: the first entry of a shared calibrated run calibrates, the others read
    its layers (running them at once would calibrate twice)."""
    first: dict[str, str] = {}
    after: dict[str, list[str]] = {}
    for p in todo:
        if p.share is not None and p.share in first:
            after[p.entry.id] = [first[p.share]]
        else:
            after[p.entry.id] = []
            if p.share is not None:
                first[p.share] = p.entry.id
    return after


def _shares(todo: list[Planned]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for p in todo:
        if p.share is not None:
            groups.setdefault(p.share, []).append(p.entry.id)
    return {i: [j for j in g if j != i] for g in groups.values() for i in g}


class Progress:
    """Entries done / running / failed / skipped, on one line (a running entry is one with a staging folder)."""

    def __init__(self, out: Path, total: int, quiet: bool):
        from tqdm import tqdm
        self.out, self.quiet = out, quiet
        self.bar = tqdm(total=total, disable=quiet, file=sys.stderr, desc="build", unit="entry", dynamic_ncols=True)
        self.counts = {"done": 0, "failed": 0, "skipped": 0}

    def add(self, r: Result) -> None:
        self.counts[r.status] += 1
        if not self.quiet:
            how = f"{r.seconds:.1f} s" + (f", attempt {r.attempt}" if r.attempt > 1 else "")
            self.bar.write(f"{r.status:>7}  {r.id}" + (f"  ({how})" if r.status == "done" else "")
                           + (f": {r.error}" if r.error else ""), file=sys.stderr)
        self.bar.update()
        self.tick()

    def tick(self) -> None:
        running = len(list((self.out / STAGING).glob("*.*"))) if (self.out / STAGING).is_dir() else 0
        self.bar.set_postfix_str(", ".join(f"{v} {k}" for k, v in self.counts.items()) + f", {running} running")

    def close(self) -> None:
        self.bar.close()


def build(matrix: Matrix, out: Path, *, ray_address: str | None = None, workers: int | None = None,
          use_ray: bool = True, force: bool = False, quiet: bool = False) -> list[Result]:
    """Run every entry of the matrix (Ray when installed and ``use_ray``, else here one by one); write
    DIR/build.json; return the results in the matrix's order."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / STAGING, ignore_errors=True)   # what a killed build left (never a finished entry)
    for f in (out / SHARED).glob("attempts-*"):
        f.unlink()
    todo, decided = plan_entries(matrix, out, force)
    progress = Progress(out, len(matrix.entries), quiet)
    for r in decided:
        progress.add(r)
    shares, after = _shares(todo), chains(todo)
    ray = _ray(use_ray)
    try:
        if ray is not None and todo:
            results = _run_ray(ray, todo, after, shares, out, ray_address, workers, progress)
        else:
            results = []
            for p in todo:
                results.append(_run_here(p, out, shares.get(p.entry.id, [])))
                progress.add(results[-1])
    finally:
        progress.close()
    by_id = {r.id: r for r in [*decided, *results]}
    ordered = [by_id[e.id] for e in matrix.entries]
    if all(r.status != "failed" for r in ordered):
        shutil.rmtree(out / SHARED, ignore_errors=True)   # kept after a failure: a rerun resumes from it
        shutil.rmtree(out / STAGING, ignore_errors=True)
    _write_record(matrix, out, ordered, ray_address if ray is not None else None, ray is not None)
    return ordered


def _run_here(p: Planned, out: Path, shares_with: list[str]) -> Result:
    """One entry in this process's care, retried as Ray would when its compile process dies."""
    for attempt in range(RETRIES + 1):
        try:
            return run_entry(p.entry, out, p.fp, shares_with)
        except WorkerDied as e:
            last = e
    return Result(p.entry.id, "failed", error=f"its compile process died {RETRIES + 1} times ({last})")


def _ray(use_ray: bool):
    if not use_ray:
        return None
    try:
        import ray
    except ImportError:
        return None
    return ray


def _run_ray(ray, todo: list[Planned], after: dict[str, list[str]], shares: dict[str, list[str]], out: Path,
             address: str | None, workers: int | None, progress: Progress) -> list[Result]:
    """Each entry a Ray task with its plan's resources; waits for its shared run's first entry; retried when its
    worker dies."""
    address = address or os.environ.get("RAY_ADDRESS")
    started_here = not ray.is_initialized()
    if started_here:
        import logging
        kw: dict[str, Any] = {"address": address} if address else {"num_cpus": workers or os.cpu_count() or 1}
        ray.init(**kw, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        biggest = max((n["Resources"].get("memory", 0) for n in nodes), default=0)
        task = ray.remote(max_retries=RETRIES, retry_exceptions=[WorkerDied])(run_entry)
        refs: dict[str, Any] = {}
        for p in todo:
            memory = min(p.memory, int(biggest)) if biggest else p.memory   # a prediction, not a promise: clamp
            refs[p.entry.id] = task.options(num_cpus=p.cpus, num_gpus=p.gpus, memory=memory or None).remote(
                p.entry, out, p.fp, shares.get(p.entry.id, []), *[refs[a] for a in after[p.entry.id]])
        results: dict[str, Result] = {}
        pending = {ref: i for i, ref in refs.items()}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            progress.tick()
            for ref in ready:
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the worker died more often than it may be retried
                    results[i] = Result(i, "failed", error=f"its worker died {RETRIES + 1} times "
                                                           f"({type(e).__name__})")
                progress.add(results[i])
        return [results[p.entry.id] for p in todo]
    finally:
        if started_here:
            ray.shutdown()


def _write_record(matrix: Matrix, out: Path, results: list[Result], address: str | None, on_ray: bool) -> None:
    from qcompile.report import atomic_write_text
    doc = {"matrix": str(matrix.path.resolve()), "qcompile": __version__,
           "scheduler": ("ray " + (address or "local")) if on_ray else "sequential",
           "entries": [asdict(r) for r in results]}
    atomic_write_text(out / BUILD_JSON, json.dumps(doc, indent=2) + "\n")


def matrix_entries(out: Path) -> list[str] | None:
    """The entry ids of a build folder (its DIR/build.json), or None for a folder that is not one."""
    try:
        doc = json.loads((out / BUILD_JSON).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        return None
    return [e["id"] for e in doc["entries"] if isinstance(e, dict) and "id" in e]


if __name__ == "__main__":   # an entry's compile process (run_entry)
    sys.exit(_compile_child(Path(sys.argv[1])))
