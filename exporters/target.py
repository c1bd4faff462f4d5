"""The Target interface: everything that differs between output formats, behind one object per format.

The compile pipeline (:mod:`qcompile.pipeline`) runs the same stages for every target and asks the target
where formats differ:

- ``check(opts)``: the options this format cannot honour, as one-line errors, before any work;
- ``assign(job)``: each tensor's type (GGUF: llama.cpp's mixes; folders: one integer grid, the head and
  embedding policy), the artifact's name, and what the cost model needs (bytes, RTN work);
- ``produce(job)``: quantize and write (GGUF streams tensor by tensor into a temporary file; the folders
  quantize every linear, then build the graph); returns an :class:`Output`;
- ``reference(job, out)``: the quantized weights as a :class:`qcompile.model.WeightSource` for the PyTorch
  reference check, and ``runner(path)``: the artifact in its own runtime (verification, ``qcompile run`` and
  ``qcompile eval``);
- ``publish`` / ``discard`` the output, and its report sections.

``job`` is the pipeline's :class:`qcompile.plan.CompilePlan` plus the run's state (``job.engine``,
``job.errors``, ...); a target reads it and never imports the app. A new format is one module with one
:func:`register`-ed class.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from qcompile.errors import UsageError


def sha256_file(path: Path, block: int = 8 << 20) -> str:
    """The hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Output:
    """What a target wrote: its files (``main`` first), and whether they still wait under temporary names."""
    main: Path
    files: list[Path]
    pending: Path | None = None          # the temporary file to rename to ``main`` on publish (GGUF)
    tensors: dict[str, Any] = field(default_factory=dict)   # quantized tensors the reference check reads
    companions: list[tuple[Path, Path]] = field(default_factory=list)  # (temporary, final) files published with it


class Target:
    """One output format (see the module docstring). Subclasses set the class attributes and override hooks."""
    name: ClassVar[str]        # the --to value
    runtime: ClassVar[str]     # what runs the artifact (also a ``qcompile eval --runtime`` value)
    looks_like: ClassVar[str]  # an artifact on disk, in words ("a .gguf file")
    sized: ClassVar[bool] = False      # chooses types per tensor within a size budget (--max-size)
    has_weights: ClassVar[bool] = False  # :meth:`weights` reads an artifact's weights back (qcompile eval)
    packaged: ClassVar[bool] = False   # can be packaged for Ollama / LM Studio (--package)
    experts: ClassVar[bool] = False    # writes a mixture-of-experts model's routed experts
    hybrid: ClassVar[bool] = False     # writes linear-attention (Gated DeltaNet) layers and their state
    # why not, in words, when it does not (what the graph exporter or runtime here lacks)
    hybrid_limitation: ClassVar[str] = "its exporter does not carry the linear-attention state"

    # ---- options and types ------------------------------------------------------------------------------
    def check(self, opts) -> None:
        """Refuse options this format cannot honour (one-line errors), before anything is read."""
        if opts.package and not self.packaged:
            raise UsageError(f"--package needs --to gguf (Ollama and LM Studio load GGUF files), not --to {self.name}")
        budget = "--max-size" if opts.max_size is not None else "--target-bpw" if opts.target_bpw is not None else None
        if budget and not self.sized:
            raise UsageError(f"{budget} needs --to gguf (it chooses GGUF types per tensor), not --to {self.name}")

    def prepare(self, job) -> None:
        """Read what choosing the method needs (after the config, before the checkpoint's tensors)."""

    def assign(self, job) -> None:
        """Choose every tensor's type, once the method is known (the target keeps them for the later hooks)."""
        raise NotImplementedError

    def scheme_name(self, job) -> str:
        """The types' name for the artifact and the report (a size budget renames it ``MIX-...``)."""
        raise NotImplementedError

    def artifact_path(self, job) -> Path:
        """The main file the run publishes (``job.scheme_name`` is set)."""
        raise NotImplementedError

    def low_bit(self, job) -> bool:
        """Whether calibration pays for this run's types (the ``auto`` method calibrates only low-bit targets)."""
        raise NotImplementedError

    def needs_statistics(self, job) -> bool:
        """Whether some type refuses to round without calibration statistics (llama.cpp's IQ3_XXS)."""
        return False

    def companion_paths(self, job) -> list[Path]:
        """Files this target writes beside the artifact and publishes with it (known after :meth:`prepare`)."""
        return []

    def size(self, job) -> int:
        """A sized target's exact artifact bytes for its current types (the allocation checks itself against it)."""
        raise NotImplementedError

    def cost_inputs(self, job) -> tuple[int, dict[tuple, int], str | None]:
        """(predicted artifact bytes, RTN work by (type, row length), folder export kind or None) for the cost plan."""
        raise NotImplementedError

    def engine_types(self, job) -> dict[str, Any]:
        """The target type of every decoder linear (HF weight name), for the calibration engine."""
        raise NotImplementedError

    def fingerprint(self, job) -> tuple:
        """What a resumed calibration must share with the interrupted one, besides model, tokens and method."""
        raise NotImplementedError

    def work_dir(self, job) -> Path:
        """The calibration engine's resume folder."""
        raise NotImplementedError

    # ---- writing and checking ---------------------------------------------------------------------------
    def produce(self, job) -> Output:
        raise NotImplementedError

    def reference(self, job, out: Output):
        """The artifact's weights as a weight source, for the PyTorch reference check."""
        raise NotImplementedError

    def runtime_logits(self, job, out: Output, tokens) -> Any:
        """Logits of ``tokens`` from the artifact in its runtime; None when the runtime is not installed."""
        raise NotImplementedError

    def publish(self, job, out: Output) -> None:
        """Move what waits under temporary names into place (after verification and the quality gate)."""

    def discard(self, job, out: Output | None) -> None:
        """Remove what :meth:`produce` wrote (a failed verification or gate leaves nothing behind)."""

    def report(self, job, out: Output) -> dict:
        """report.json's sections this format fills (:mod:`qcompile.report_types`): ``target``, ``calibration``,
        ``artifact``, ``tensors`` and the format's own (``tensor_types``, ``allocation``), by field name."""
        raise NotImplementedError

    # ---- artifacts in the wild ---------------------------------------------------------------------------
    @classmethod
    def detect(cls, path: Path) -> bool:
        """Whether ``path`` is an artifact of this format."""
        raise NotImplementedError

    @classmethod
    def runtime_available(cls) -> bool:
        """Whether the artifact's runtime is installed."""
        raise NotImplementedError

    @classmethod
    def runner(cls, path: Path, threads: int | None = None):
        """The artifact in its own runtime: ``.logits(tokens) -> [tokens, vocab]``."""
        raise NotImplementedError

    @classmethod
    def generate(cls, path: Path, prompt: str, max_tokens: int, raw: bool, threads: int | None = None) -> str:
        """Greedy text from the artifact in its runtime (``raw``: the prompt as is, else as a chat user turn)."""
        raise NotImplementedError

    @classmethod
    def weights(cls, path: Path, cfg):
        """The artifact's weights as a :class:`qcompile.model.WeightSource` (dequantized exactly as the runtime
        computes), for ``qcompile eval``'s PyTorch path; None where the format has no such reader."""
        return None


TARGETS: dict[str, type[Target]] = {}


def register(cls: type[Target]) -> type[Target]:
    TARGETS[cls.name] = cls
    return cls


def get(name: str) -> Target:
    """The target called ``name``; a usage error naming the others otherwise."""
    try:
        return TARGETS[name]()
    except KeyError:
        raise UsageError(f"--to {name}: not available yet; supported targets: {', '.join(TARGETS)}") from None


def for_artifact(path: Path) -> type[Target] | None:
    """The format of an artifact on disk (a .gguf file, an ONNX or OpenVINO folder), or None."""
    return next((t for t in TARGETS.values() if t.detect(path)), None)
