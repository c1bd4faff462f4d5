"""``--max-size`` / ``--target-bpw``: GGUF types chosen per tensor to fit a byte budget with the least KLD.

The budget counts the whole file. What the choice cannot change (header, metadata, vocabulary, tensor
table, norms, the embedding table) is sized exactly from the plan (:func:`exporters.gguf.header_bytes`);
the rest is spent by :func:`quantizers.allocate.allocate` on the *tunable* tensors (every decoder linear
and an untied output matrix), using the KLD each (tensor, type) is predicted to add
(:mod:`calibration.sensitivity`). The candidates per tensor are Q4_K, Q5_K, Q6_K, Q8_0 (after llama.cpp's
fallback for rows not divisible by 256) and the base scheme's own type for it, so the base mix is always
one of the allocations considered.

The embedding table keeps the base scheme's type: it is a lookup, and its Fisher would only see the rows
of the tokens that occur in the calibration text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from exporters.gguf import PlannedTensor, padded
from qcompile.errors import QCompileError
from qcompile.model import ModelConfig
from qcompile.units import parse_size
from quantizers.allocate import Allocation, Option, allocate
from quantizers.schemes import BUDGET_TYPES, LOW_TYPES, candidate_types
from quantizers.tensor import row_bytes


@dataclass(frozen=True)
class Budget:
    """A size budget for the whole GGUF file, in bytes, and the option that set it (for messages)."""
    bytes: int
    request: str


def parse_budget(max_size: str | None, target_bpw: float | None, n_params: int) -> Budget | None:
    """The budget from ``--max-size`` (bytes with an optional unit) or ``--target-bpw`` (bits per weight
    over all ``n_params`` parameters, as report.json's ``bits_per_weight`` counts them); None if neither."""
    if max_size is not None:
        return Budget(parse_size(max_size, "--max-size"), f"--max-size {max_size}")
    if target_bpw is not None:
        if not (target_bpw > 0 and math.isfinite(target_bpw)):
            raise QCompileError(f"--target-bpw {target_bpw:g}: must be a positive number of bits per weight")
        return Budget(math.floor(target_bpw * n_params / 8), f"--target-bpw {target_bpw:g}")
    return None


def tunable(p: PlannedTensor, cfg: ModelConfig) -> bool:
    """Whether the budget chooses this tensor's type: decoder linears and an untied output matrix."""
    if p.name == "output.weight":
        return not cfg.tie_word_embeddings
    return cfg.arch.is_linear(p.source) or cfg.arch.is_expert(p.source)   # an MoE's stacked experts too


def _nbytes(p: PlannedTensor, t: T) -> int:
    return padded(int(np.prod(p.shape[:-1])) * row_bytes(t, p.shape[-1]))


@dataclass
class SizeModel:
    """The file's bytes as a function of the tunable tensors' types."""
    fixed: int                              # header + every tensor the budget does not choose
    options: dict[str, list[tuple[T, int]]]  # tunable tensor (GGUF name) -> (type, bytes in the file)

    @property
    def smallest(self) -> int:
        return self.fixed + sum(min(b for _, b in opts) for opts in self.options.values())

    @property
    def largest(self) -> int:
        return self.fixed + sum(max(b for _, b in opts) for opts in self.options.values())


def size_model(plan: list[PlannedTensor], cfg: ModelConfig, header: int) -> SizeModel:
    """Candidates and their sizes for each tunable tensor of ``plan`` (the base scheme's types), and the
    fixed bytes (``header``: :func:`exporters.gguf.header_bytes` of the plan)."""
    fixed, options = header, {}
    # a base mix below 4 bits (Q3_K_M, Q2_K, ...) offers its own low types to every tunable tensor, so a
    # budget at its size has somewhere to take bytes from (after each tensor's fallback for its width)
    low = tuple(dict.fromkeys(p.type for p in plan if tunable(p, cfg) and p.type in LOW_TYPES))
    for p in plan:
        if tunable(p, cfg):
            types = list(dict.fromkeys([*candidate_types(p.shape[-1], low + BUDGET_TYPES), p.type]))
            options[p.name] = [(t, _nbytes(p, t)) for t in types]
        else:
            fixed += padded(p.nbytes)
    return SizeModel(fixed, options)


def base_bytes(sizes: SizeModel, plan: list[PlannedTensor]) -> int:
    """The file's bytes with every tunable tensor at its type in ``plan`` (the base scheme's mix)."""
    types = {p.name: p.type for p in plan}
    return sizes.fixed + sum(dict(opts)[types[name]] for name, opts in sizes.options.items())


def check_budget(budget: Budget, sizes: SizeModel, n_params: int) -> None:
    """A budget the candidates cannot meet, or one so large that no choice is needed, is an error."""
    def show(b: int) -> str:
        return f"{b} bytes = {b / 2**20:.1f} MiB = {8 * b / n_params:.3f} bits/weight"
    if budget.bytes < sizes.smallest:
        raise QCompileError(f"{budget.request}: below the smallest mix ({show(sizes.smallest)}; every tunable "
                            f"tensor at its cheapest candidate)")
    if budget.bytes > sizes.largest:
        raise QCompileError(f"{budget.request}: above the largest mix ({show(sizes.largest)}; every tunable "
                            f"tensor at its largest candidate): nothing to choose, use --quant Q8_0")


def choose_mix(plan: list[PlannedTensor], sizes: SizeModel, predicted: dict[str, dict[T, float]],
               budget: Budget) -> tuple[list[PlannedTensor], Allocation]:
    """The plan with each tunable tensor's type chosen within the budget (``predicted``: KLD per GGUF tensor
    name and type)."""
    cands = {name: [Option(t, b, predicted[name][t]) for t, b in opts] for name, opts in sizes.options.items()}
    alloc = allocate(cands, budget.bytes - sizes.fixed)
    types = alloc.types
    return [replace(p, type=types[p.name]) if p.name in types else p for p in plan], alloc


def analyse(cfg: ModelConfig, source, plan: list[PlannedTensor], sizes: SizeModel, tokens: np.ndarray, *,
            use_imatrix: bool, gptq_head: bool = False, device: str, seed: int, threads: int | None,
            progress: Callable[[str], None] = lambda s: None) -> tuple[dict[str, dict[T, float]], dict]:
    """Predicted KLD per tunable tensor (GGUF name) and candidate type, from the diagonal Fisher on the
    first :data:`~calibration.sensitivity.SAMPLES` calibration windows (at most ``SEQLEN`` tokens each),
    one decoder layer in memory at a time; and a description of the analysis for the report.

    ``progress`` is called once per window and once per tunable tensor."""
    from calibration import sensitivity as sens
    by_name = {p.name: p for p in plan}
    sources = {by_name[n].source: n for n in sizes.options}
    windows = np.ascontiguousarray(tokens[:sens.SAMPLES, :sens.SEQLEN])
    types = {src: [t for t, _ in sizes.options[name]] for src, name in sources.items()}
    res = sens.sensitivity(cfg, source, windows, types, use_imatrix=use_imatrix, gptq_head=gptq_head,
                           device=device, seed=seed, threads=threads, progress=progress)
    info = {"method": "diagonal Fisher of the model's own predictive distribution (one sampled label per "
                      "position) x squared RTN error" + (" (imatrix-weighted)" if use_imatrix else "")
                      + ("; the output matrix's scaled by its GPTQ/RTN output-error ratio" if gptq_head else ""),
            "sequences": res.sequences, "tokens": res.tokens, "seed": seed, "device": device}
    return {sources[src]: v for src, v in res.predicted.items()}, info


def report(budget: Budget, sizes: SizeModel, base: list[PlannedTensor], alloc: Allocation,
           predicted: dict[str, dict[T, float]], info: dict) -> dict:
    """report.json's ``allocation`` section. Predicted KLDs cover the tunable tensors only (mean per token,
    nats; the embedding table's share is the same for every choice and not predicted)."""
    base_types = {p.name: p.type for p in base if p.name in sizes.options}
    return {
        "request": budget.request, "budget_bytes": budget.bytes, "bytes": sizes.fixed + alloc.bytes,
        "fixed_bytes": sizes.fixed, "smallest_bytes": sizes.smallest, "largest_bytes": sizes.largest,
        "predicted_kld": alloc.kld, "predicted_kld_lower_bound": alloc.lower_bound,
        "base_bytes": base_bytes(sizes, base),
        "base_predicted_kld": sum(predicted[n][t] for n, t in base_types.items()),
        "sensitivity": info,
        "tensors": {name: {"type": alloc.choice[name].type.name,
                           "options": {t.name: {"bytes": b, "predicted_kld": predicted[name][t]} for t, b in opts}}
                    for name, opts in sizes.options.items()},
    }
