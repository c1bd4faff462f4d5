"""A side environment for optimum-onnx, which cannot share a Python environment with qcompile.

optimum-onnx 0.1.0 (the latest release) pins ``transformers < 4.58`` and ``optimum ~= 2.1``; qcompile runs on
transformers 5.x, and optimum-onnx fails at import there (it uses 4.5x internals such as
``transformers.modeling_utils.get_parameter_dtype``). Rather than downgrade the user's environment, the
checks that need ``ORTModelForCausalLM`` or optimum's own ONNX exporter run in a child process whose
``PYTHONPATH`` puts a small overlay first: pinned transformers, optimum, optimum-onnx, huggingface_hub and
tokenizers installed with ``pip install --no-deps --target``. Everything else (torch, onnx, onnxruntime,
numpy) comes from the current environment. There is no library for this; pip's ``--target`` is the tool.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The one combination that imports and runs together (checked by tests/test_onnx.py).
PINS = ("transformers==4.57.6", "optimum==2.1.0", "optimum-onnx==0.1.0", "huggingface_hub==0.36.2",
        "tokenizers==0.22.2")
DEFAULT_DIR = Path.home() / ".cache" / "qcompile-test-assets" / ("optimum-overlay-" + "-".join(
    p.split("==")[1] for p in PINS[:3]))


def ensure(path: Path = DEFAULT_DIR) -> Path:
    """The overlay folder, installed on first use (one ``pip`` call, ~140 MB); raises ``RuntimeError``
    with pip's last line when it cannot be installed (no package index reachable)."""
    if (path / "optimum" / "onnxruntime").is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp), *PINS],
                          capture_output=True, text=True)
    if proc.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"cannot install the optimum-onnx overlay: {lines[-1] if lines else 'pip failed'}")
    try:
        tmp.rename(path)  # a concurrent installer may have won; either copy is complete
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def run(code: str, *args: str, overlay: Path | None = None, timeout: float = 1800) -> str:
    """Run Python ``code`` (with ``sys.argv[1:] = args``) under the overlay; return its stdout.
    Raises ``RuntimeError`` with the child's last stderr line when it fails."""
    overlay = overlay or ensure()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(overlay), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit {proc.returncode}")
    return proc.stdout
