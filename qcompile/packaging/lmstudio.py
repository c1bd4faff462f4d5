"""LM Studio: the ``<publisher>/<Model>-GGUF/<Model>-<TYPE>.gguf`` folder layout its model directory uses,
and a model card (``README.md``) with provenance, license, quality metrics and checksum."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from qcompile import __version__
from qcompile.packaging import templates as T
from qcompile.report_types import Metrics, Report


def layout(lmstudio_root: Path, publisher: str, model_name: str, scheme: str) -> tuple[Path, Path]:
    """(model folder, GGUF path) inside ``lmstudio_root``."""
    folder = lmstudio_root / _safe(publisher) / f"{_safe(model_name)}-GGUF"
    return folder, folder / f"{_safe(model_name)}-{scheme}.gguf"


def _safe(part: str) -> str:
    # one path component: hub names are [\w.-]; anything else (a local folder name) is mapped onto that
    s = re.sub(r"[^\w.-]+", "-", part).strip(".-")
    return s or "model"


def license_of(model_dir: Path) -> str | None:
    """The license id from config.json or the README's YAML front matter (``license: apache-2.0``)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        if isinstance(cfg.get("license"), str):
            return cfg["license"]
    except (OSError, ValueError):
        pass
    try:
        text = (model_dir / "README.md").read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.match(r"---\s*\n(.*?)\n---\s*\n", text, re.DOTALL)
    if not m:
        return None
    lic = re.search(r"^license:\s*['\"]?([^'\"\n#]+?)['\"]?\s*$", m.group(1), re.MULTILINE)
    return lic.group(1).strip() if lic else None


def _human(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _quality(metrics: Metrics) -> str:
    ref = metrics.reference
    if ref is None:
        return "Not verified (built with `--no-verify`)."
    rows = [
        ("Measured by qcompile against the full-precision model in PyTorch "
         f"({ref.tokens} tokens, {ref.windows} windows of {ref.ctx}):"),
        "",
        "| metric | value |",
        "|---|---|",
        f"| perplexity (full precision -> quantized) | {ref.ppl_fp:.4f} -> {ref.ppl_quant:.4f} |",
        f"| mean KL divergence | {ref.kld_mean:.5f} |",
        f"| p99 KL divergence | {ref.kld_p99:.5f} |",
        f"| top-1 agreement | {100 * ref.top1:.2f}% |",
    ]
    art = metrics.artifact
    if art:
        rows += ["", (f"In {art.runtime} ({art.tokens} tokens) the file's logits match the dequantized "
                      f"model within a relative error of {art.rel_error:.2e} (top-1 {100 * art.top1:.2f}%).")]
    return "\n".join(rows)


def model_card(rep: Report, *, model_name: str, repo: str | None, license_id: str | None, file_name: str) -> str:
    """README.md for the LM Studio folder, from report.json's content."""
    front = {"base_model": repo, "license": license_id, "quantized_by": "qcompile", "library_name": "gguf",
             "pipeline_tag": "text-generation"}
    front_matter = "".join(f"{k}: {v}\n" for k, v in front.items() if v)
    front_matter += "tags:\n- gguf\n- qcompile\n"
    target, art = rep.target, rep.artifact
    calib = rep.calibration
    source = rep.model.source
    return T.MODEL_CARD.format(
        front_matter=front_matter, model_name=model_name, scheme=target.scheme, version=__version__,
        source_line=f"[{repo}](https://huggingface.co/{repo})" if repo else f"`{source}` (local checkpoint)",
        license_line=license_id or "not recorded in the checkpoint; see the source model's card",
        method=target.method, calibration=f"; calibration: {calib}" if calib else "",
        bits_per_weight=art.bits_per_weight, file=file_name, size_human=_human(art.bytes),
        size_bytes=f"{art.bytes:,}", sha256=art.sha256, quality=_quality(rep.metrics),
        command=shlex.join(rep.tool.command))
