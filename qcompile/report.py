"""``report.json``: the machine-readable record of one compile (schema: docs/report-schema.md)."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from exporters.target import sha256_file  # noqa: F401 - report.sha256_file, for the packaging
from qcompile.errors import QCompileError
from qcompile.report_types import SCHEMA_VERSION, Report  # noqa: F401 - SCHEMA_VERSION for the readers


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("qcompile", "numpy", "gguf", "libggml-python", "torch", "transformers", "tokenizers",
                "llama_cpp_python"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        # mkstemp makes the file 0600; a report is for others (CI, teammates) to read, like the artifact
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(path: Path, report: Report) -> None:
    atomic_write_text(path, json.dumps(report.to_dict(), indent=2, sort_keys=False) + "\n")


def read_report(path: Path) -> dict[str, Any]:
    """A ``report.json`` as written by :func:`write_report`; a one-line :class:`QCompileError` when the file
    cannot be read, is not JSON, or lacks the keys every version has (``schema_version``, ``artifact``).
    Which schema versions a reader accepts is the reader's call."""
    try:
        rep = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise QCompileError(f"{path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise QCompileError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise QCompileError(f"{path}: not JSON ({e})") from None
    if not isinstance(rep, dict) or not isinstance(rep.get("schema_version"), int) \
            or not isinstance(rep.get("artifact"), dict):
        raise QCompileError(f"{path}: not a qcompile report.json")
    return rep


def load_report(path: Path) -> Report:
    """:func:`read_report` as the typed :class:`Report` (any schema version this qcompile knows or older)."""
    return Report.from_dict(read_report(path))
