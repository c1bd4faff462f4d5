"""The small public API: what benchmarks, notebooks and other tools call instead of the pipeline's internals.

- :func:`plan`: every decision of a compile (target, method, each tensor's type, a size budget and its size
  model, the predicted cost) without running it or writing anything;
- :func:`compile`: run a compile, as ``qcompile MODEL ...`` does; returns the report;
- :func:`evaluate`: perplexity / KLD / top-1 of an artifact against the full-precision model, as
  ``qcompile eval`` does.

Options are the command line's, as keyword arguments (``quant="Q4_K_M"``, ``calib="file.txt"``, ...).
"""
from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from qcompile.plan import CompilePlan, Options, build

__all__ = ["CompilePlan", "Options", "compile", "evaluate", "plan"]


def options(model: str | Path, out: str | Path = ".", **kw: Any) -> Options:
    """The compile options for ``model`` (``Options`` fields as keywords; unknown names are a TypeError)."""
    known = {f.name for f in fields(Options)}
    bad = sorted(set(kw) - known)
    if bad:
        raise TypeError(f"unknown compile options: {', '.join(bad)}")
    return Options(model=str(model), out=Path(out), **kw)


def plan(model: str | Path, **kw: Any) -> CompilePlan:
    """Every decision of a compile, made and checked, nothing run or written (``--dry-run``'s work, quietly):
    ``p.target``, ``p.method``, ``p.target.types`` (GGUF: ``.plan`` of planned tensors), ``p.budget`` and
    ``p.sizes`` (the size model), ``p.cost``."""
    return build(replace(options(model, **kw), dry_run=True, quiet=True), announce=False)


def compile(model: str | Path, out: str | Path, **kw: Any) -> dict:  # noqa: A001 - the verb is the API
    """Compile ``model`` into ``out``; returns report.json's content."""
    from qcompile.pipeline import compile_model
    return compile_model(options(model, out, **kw))


def evaluate(model: str | Path, text: str | Path, artifact: str | Path | None = None, *, runtime: str = "auto",
             ctx: int = 512, max_tokens: int = 4096, stride: int | None = None, threads: int | None = None,
             family: str = "instruct", offline: bool = True, quiet: bool = True) -> dict:
    """``qcompile eval``: results per path (``"pytorch"``, the artifact's runtime; ``"fp"`` alone without an
    artifact) with ppl, mean / p99 KLD and top-1 agreement."""
    from qcompile.eval_command import evaluate_artifact
    args = argparse.Namespace(model=str(model), text=Path(text), artifact=Path(artifact) if artifact else None,
                              runtime=runtime, ctx=ctx, max_tokens=max_tokens, stride=stride, threads=threads,
                              family=family, offline=offline, quiet=quiet, json=None)
    return evaluate_artifact(args)
