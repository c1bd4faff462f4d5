"""Side environments for optimum-onnx and optimum-intel, which cannot share a Python environment with qcompile.

optimum-onnx 0.1.0 (the latest release) pins ``transformers < 4.58`` and ``optimum ~= 2.1``; optimum-intel 2.2
pins ``transformers < 5.6`` and ``optimum ~= 2.3``; qcompile runs on current transformers 5.x, and
optimum-onnx fails at import there (it uses 4.5x internals such as
``transformers.modeling_utils.get_parameter_dtype``). Rather than downgrade the user's environment, the
checks that need ``ORTModelForCausalLM`` / ``OVModelForCausalLM`` or optimum's own exporters run in a child
process whose ``PYTHONPATH`` puts a small overlay first: the pinned transformers, optimum, optimum-onnx or
optimum-intel, huggingface_hub and tokenizers installed with ``pip install --no-deps --target``. Everything
else (torch, onnx, onnxruntime, openvino, numpy) comes from the current environment. There is no library
for this; pip's ``--target`` is the tool.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Combinations that import and run together (checked by tests/test_onnx.py and tests/test_openvino.py).
PINS = {
    "onnx": ("transformers==4.57.6", "optimum==2.1.0", "optimum-onnx==0.1.0", "huggingface_hub==0.36.2",
             "tokenizers==0.22.2"),
    "openvino": ("transformers==5.5.4", "optimum==2.3.0", "optimum-intel==2.2.0", "huggingface_hub==1.21.0",
                 "tokenizers==0.22.2", "httpx==0.28.1", "httpcore==1.0.9", "h11==0.16.0", "anyio==4.16.0"),
}
_MARKER = {"onnx": ("optimum", "onnxruntime"), "openvino": ("optimum", "intel")}
ROOT = Path.home() / ".cache" / "qcompile-test-assets"


def default_dir(kind: str) -> Path:
    return ROOT / ("optimum-overlay-" + "-".join(p.split("==")[1] for p in PINS[kind][:3]))


def ensure(kind: str = "onnx", path: Path | None = None) -> Path:
    """The ``kind`` ("onnx" or "openvino") overlay folder, installed on first use (one ``pip`` call, ~150 MB);
    raises ``RuntimeError`` with pip's last line when it cannot be installed (no package index reachable)."""
    path = path or default_dir(kind)
    if path.joinpath(*_MARKER[kind]).is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
                           *PINS[kind]],
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


def run(code: str, *args: str, overlay: Path | None = None, kind: str = "onnx", timeout: float = 1800) -> str:
    """Run Python ``code`` (with ``sys.argv[1:] = args``) under the ``kind`` overlay; return its stdout.
    Raises ``RuntimeError`` with the child's last stderr line when it fails."""
    overlay = overlay or ensure(kind)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(overlay), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit {proc.returncode}")
    return proc.stdout
