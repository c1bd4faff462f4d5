"""``--calib-cache DIR``: calibration work that several compiles of one model share.

A fleet (``qcompile build``) compiles one checkpoint into several formats and types with one calibration. The two
costly parts are kept here, keyed by everything they depend on, so the second compile reads what the first made:

* the calibration tokens (``tokens-{key}.npz``): the same windows for every compile with the same model,
  ``--calib``, samples, sequence length and seed (self-generated ones included, the slowest to make);
* the calibrated layers (``engine-{fingerprint}/``, the layer engine's resume folder, kept instead of removed):
  a compile with the same tokens, method and weight grid (ONNX and OpenVINO at INT4_G128) takes its quantized
  tensors instead of running GPTQ again, and gets identical weights. An interrupted compile resumes there from
  its last finished layer.

Compiles that need the same entry at once take turns (``flock`` on a lock file beside it; the kernel releases it
when a process dies, so a killed worker never blocks its retry).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from exporters.target import sha256_file
from qcompile.errors import QCompileError


def model_identity(path: Path) -> dict:
    """What identifies a checkpoint directory's content without reading its weights: config.json's bytes and
    every other file's name, size and modification time (a re-downloaded or edited shard changes it)."""
    files = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts):
            st = f.stat()
            files[f.relative_to(path).as_posix()] = [st.st_size, st.st_mtime_ns]
    config = path / "config.json"
    return {"config_sha256": sha256_file(config) if config.is_file() else None, "files": files}


def source_identity(spec: str) -> str:
    """A calibration source as its content: a file's (or a folder's files') sha256, else the spec itself."""
    p = Path(spec)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(f.relative_to(p).as_posix().encode() + b"\0" + sha256_file(f).encode())
        return h.hexdigest()
    return spec


def key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CalibCache:
    """One ``--calib-cache`` folder."""

    def __init__(self, root: Path):
        self.root = root
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QCompileError(f"--calib-cache {root}: cannot create directory ({e.strerror})") from None

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Exclusive use of one entry for the duration (other processes wait)."""
        with open(self.root / f"{name}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def tokens(self, token_key: str, make: Callable[[], tuple[np.ndarray, str]]) -> tuple[np.ndarray, str, bool]:
        """(tokens, description, whether they came from the cache): ``make()``'s, made once per key."""
        name = f"tokens-{token_key}"
        path = self.root / f"{name}.npz"
        with self.locked(name):
            if path.is_file():
                with np.load(path) as z:
                    return z["tokens"], str(z["info"]), True
            tokens, info = make()
            tmp = self.root / f".{name}.{os.getpid()}.npz"
            with open(tmp, "wb") as f:
                np.savez(f, tokens=tokens, info=np.array(info))
            os.replace(tmp, path)
            return tokens, info, False

    def engine_dir(self, fingerprint: str) -> Path:
        return self.root / f"engine-{fingerprint}"
