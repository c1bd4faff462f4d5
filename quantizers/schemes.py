"""Which GGUF type each tensor gets: llama.cpp's per-tensor mixes (``Q4_K_M`` …) and pure types.

This follows ``llama_tensor_get_type`` in llama.cpp's ``src/llama-quant.cpp`` for the Qwen
architectures, so a qcompile ``Q4_K_M`` has the same tensor types (and file size) as
``llama-quantize … Q4_K_M``: attn_v / ffn_down get Q6_K on the ``use_more_bits`` layer schedule, the
output matrix (or the tied embedding) Q6_K, and rows whose length is not a multiple of a type's block
fall back (Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, Q2_K/Q3_K→Q4_0, IQ4_XS and the IQ3/IQ2 codebooks→IQ4_NL,
then F16). The 3- and 2-bit mixes (``Q3_K_S/M/L``, ``Q2_K``, ``IQ3_XXS``) follow the same function's
branches for them: attn_v / ffn_down / attn_output a step or two up, ``IQ3_XXS``'s attn_q/attn_k down to
``IQ2_S`` and its output at Q5_K.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from qcompile.errors import UsageError
from quantizers.grids import GRIDS

# name -> (base type, llama.cpp file type)
PRESETS: dict[str, tuple[T, F]] = {
    "F32": (T.F32, F.ALL_F32), "F16": (T.F16, F.MOSTLY_F16), "BF16": (T.BF16, F.MOSTLY_BF16),
    "Q8_0": (T.Q8_0, F.MOSTLY_Q8_0), "Q6_K": (T.Q6_K, F.MOSTLY_Q6_K),
    "Q5_K_M": (T.Q5_K, F.MOSTLY_Q5_K_M), "Q5_K_S": (T.Q5_K, F.MOSTLY_Q5_K_S),
    "Q4_K_M": (T.Q4_K, F.MOSTLY_Q4_K_M), "Q4_K_S": (T.Q4_K, F.MOSTLY_Q4_K_S),
    "Q5_0": (T.Q5_0, F.MOSTLY_Q5_0), "Q5_1": (T.Q5_1, F.MOSTLY_Q5_1),
    "Q4_0": (T.Q4_0, F.MOSTLY_Q4_0), "Q4_1": (T.Q4_1, F.MOSTLY_Q4_1),
    "IQ4_NL": (T.IQ4_NL, F.MOSTLY_IQ4_NL), "IQ4_XS": (T.IQ4_XS, F.MOSTLY_IQ4_XS),
    "Q3_K_L": (T.Q3_K, F.MOSTLY_Q3_K_L), "Q3_K_M": (T.Q3_K, F.MOSTLY_Q3_K_M), "Q3_K_S": (T.Q3_K, F.MOSTLY_Q3_K_S),
    "IQ3_XXS": (T.IQ3_XXS, F.MOSTLY_IQ3_XXS), "Q2_K": (T.Q2_K, F.MOSTLY_Q2_K),
}
# pure single types that are not a preset of their own
PURE_ONLY: dict[str, tuple[T, F]] = {"Q4_K": (T.Q4_K, F.MOSTLY_Q4_K_M), "Q5_K": (T.Q5_K, F.MOSTLY_Q5_K_M),
                                     "Q3_K": (T.Q3_K, F.MOSTLY_Q3_K_M)}
BITS_PRESET = {8: "Q8_0", 4: "Q4_K_M"}
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.IQ4_XS: T.IQ4_NL, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0,
             T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ2_S: T.IQ4_NL}
# block lengths of the ggml types with no Grid here (codebook i-quants: rounded by ggml, see quantizers.gptq)
_BLOCK = {T.IQ3_XXS: 256, T.IQ3_S: 256, T.IQ2_S: 256}
_IQ_LOW = (F.MOSTLY_IQ3_XXS,)
# the mixes whose attn_output llama.cpp raises to Q5_K in an 8-expert model
_ATTN_OUT_8_EXPERTS = (F.MOSTLY_Q2_K, F.MOSTLY_IQ3_XXS, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_IQ4_NL,
                       F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M, F.MOSTLY_IQ4_XS)  # llama.cpp's IQ1/IQ2/IQ3_XXS family: output Q5_K rather than Q6_K


def block_size(t: T) -> int:
    return GRIDS[t].block if t in GRIDS else _BLOCK.get(t, 1)


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class Scheme:
    """A named quantization scheme: a llama.cpp-style mix, or one type everywhere (``pure``)."""
    name: str
    base: T
    file_type: F
    pure: bool = False
    has_imatrix: bool = False

    @property
    def quantized(self) -> bool:
        return self.base not in (T.F32, T.F16, T.BF16)

    def tensor_type(self, gguf_name: str, shape: tuple[int, ...], *, layer: int | None, n_layers: int,
                    n_gqa: int, tied: bool, n_expert: int = 0) -> T:
        """The GGUF type for one tensor (``shape`` in PyTorch order, last dim = row length; an MoE's stacked
        expert tensors are 3-D, ``n_expert`` their count)."""
        if len(shape) < 2 or "_norm" in gguf_name or "ffn_gate_inp" in gguf_name or "ssm_conv1d" in gguf_name:
            # 1-D tensors (norms, biases), the MoE routers (ffn_gate_inp, ffn_gate_inp_shexp) and the linear
            # attention's conv1d stay F32, as llama.cpp's converter writes them and llama-quantize leaves them
            return T.F32
        if not self.quantized:
            return self.base
        ncols = shape[-1]
        t = self.base if self.pure else self._mix_type(gguf_name, ncols, layer, n_layers, n_gqa, tied, n_expert)
        return fallback(t, ncols)

    def _mix_type(self, name: str, ncols: int, i: int | None, n: int, n_gqa: int, tied: bool,
                  n_expert: int = 0) -> T:
        ft, t = self.file_type, self.base
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if ncols % block_size(t):
                return T.Q8_0
            if ft in _IQ_LOW:
                return T.Q5_K
            return t if t == T.Q8_0 else T.Q6_K
        if name == "token_embd.weight":
            return T.IQ3_S if ft == F.MOSTLY_IQ3_XXS else t
        if name.endswith(("attn_v.weight", "attn_qkv.weight")):
            # llama.cpp counts a linear-attention layer's fused attn_qkv as an attn_v (category_is_attn_v)
            if ft == F.MOSTLY_Q2_K:
                t = T.Q4_K if n_gqa >= 4 else T.Q3_K
            elif ft == F.MOSTLY_IQ3_XXS:
                t = T.Q4_K if n_gqa >= 4 else T.IQ3_XXS if self.has_imatrix else T.IQ3_S
            elif ft == F.MOSTLY_Q3_K_M:
                t = T.Q5_K if i < 2 else T.Q4_K
            elif ft == F.MOSTLY_Q3_K_L:
                t = T.Q5_K
            elif ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and n_gqa >= 4:
                t = T.Q5_K
            elif ft in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(i, n):
                t = T.Q6_K
            elif ft == F.MOSTLY_Q4_K_S and i < 4:
                t = T.Q5_K
            if n == 80 and t in (T.Q3_K, T.Q4_K):  # llama.cpp's LLM_TYPE_70B rule (80-layer Qwen2.5-72B)
                t = T.Q5_K
            # llama.cpp's rules keyed on exactly 8 experts (written for Mixtral; they fire for any 8-expert MoE)
            return T.Q8_0 if n_expert == 8 else t
        if name.endswith("attn_k.weight") and n_expert == 8:
            return T.Q8_0
        if name.endswith(("attn_k.weight", "attn_q.weight")):
            return T.IQ2_S if ft == F.MOSTLY_IQ3_XXS else t
        if name.endswith("attn_output.weight"):
            if n_expert == 8:
                return T.Q5_K if ft in _ATTN_OUT_8_EXPERTS else t
            return {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_IQ3_XXS: T.IQ3_S, F.MOSTLY_Q3_K_M: T.Q4_K,
                    F.MOSTLY_Q3_K_L: T.Q5_K}.get(ft, t)
        if "ffn_down" in name:   # ffn_down, and an MoE's ffn_down_exps / ffn_down_shexp by their layer
            if ft == F.MOSTLY_Q2_K:
                return T.Q3_K
            if ft == F.MOSTLY_IQ3_XXS and not self.has_imatrix:
                return T.Q4_K if i < n // 8 else T.Q3_K
            if ft == F.MOSTLY_Q3_K_M:
                return T.Q5_K if i < n // 16 else T.Q4_K
            if ft == F.MOSTLY_Q3_K_L:
                return T.Q5_K
            if ft in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(i, n):
                return T.Q6_K
            if ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and i < n // 8 and not self.has_imatrix:
                return T.Q5_K
            if ft == F.MOSTLY_Q4_K_S and i < n // 8:
                return T.Q5_K
            if ft in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and self.has_imatrix and i < n // 8:
                return T.Q4_1 if ft == F.MOSTLY_Q4_0 else T.Q5_1
        return t


def fallback(t: T, ncols: int) -> T:
    """llama.cpp's fallback for rows not divisible by the type's block (e.g. hidden 896 with K-quants)."""
    if ncols % block_size(t) == 0:
        return t
    t = _FALLBACK.get(t, t)
    return t if ncols % block_size(t) == 0 else T.F16


# the types a size budget chooses from per tensor (--max-size): llama.cpp's K-quant ladder and Q8_0
BUDGET_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
# below BUDGET_TYPES' 4 bits: a budget over a base mix with these offers them to every tensor (budget.size_model)
LOW_TYPES = (T.Q2_K, T.Q3_K, T.IQ3_XXS, T.IQ3_S, T.IQ2_S)


def candidate_types(ncols: int, types: tuple[T, ...] = BUDGET_TYPES) -> list[T]:
    """``types`` for rows of ``ncols`` values, each after llama.cpp's fallback, without repeats
    (hidden size 896: Q5_0, Q5_1, Q8_0)."""
    return list(dict.fromkeys(fallback(t, ncols) for t in types))


def scheme(name: str, *, pure: bool = False, has_imatrix: bool = False) -> Scheme:
    """Look up ``Q4_K_M``, ``Q8_0``, ``F16``, … (``pure`` = that base type everywhere)."""
    key = name.upper()
    if key in PRESETS:
        base, ft = PRESETS[key]
    elif key in PURE_ONLY:
        (base, ft), pure = PURE_ONLY[key], True
    else:
        raise UsageError(f"unknown quantization type {name!r}; choose from {', '.join(available())}")
    return Scheme(key, base, ft, pure, has_imatrix)


def available() -> list[str]:
    return list(PRESETS) + list(PURE_ONLY)
